"""Development and deployment support: the local S3 server, cluster specs, images."""
