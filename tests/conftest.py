"""Session-wide real services: the local S3 server (SeaweedFS) with a sentinel secret key."""

from __future__ import annotations

import os

import pytest

from lora_merge import s3_server

# Must never appear in any output, log line or error message.
SENTINEL_SECRET = "SENTINEL-secret-7f3a9c1e5d-do-not-print"
BUCKET = "models"


# Tests are marked by the services their fixtures start (`make test-fast` runs those needing none).
CLUSTER_FIXTURES = {"two_node_cluster", "ray_session"}


def pytest_collection_modifyitems(items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if "s3" in used:
            item.add_marker(pytest.mark.s3)
        if used & CLUSTER_FIXTURES:
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    server = s3_server.start(str(tmp_path_factory.mktemp("s3")), access_key="lora-merge-tests",
                             secret_key=SENTINEL_SECRET)
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())  # subprocesses and Ray nodes started later inherit it
    server.create_bucket(BUCKET)
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    s3_server.stop(s3_server.load(server.data_dir))  # the latest start, should a test have restarted it


def upload_dir(server: s3_server.S3Server, local: str, prefix: str) -> str:
    client = server.client()
    for name in sorted(os.listdir(local)):
        client.upload_file(os.path.join(local, name), BUCKET, f"{prefix}/{name}")
    return f"s3://{BUCKET}/{prefix}"


def list_keys(server: s3_server.S3Server, prefix: str) -> list[str]:
    page = server.client().list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/")
    return sorted(o["Key"][len(prefix) + 1:] for o in page.get("Contents", []))


def open_uploads(server: s3_server.S3Server, prefix: str) -> list[str]:
    page = server.client().list_multipart_uploads(Bucket=BUCKET, Prefix=f"{prefix}/")
    return [u["Key"] for u in page.get("Uploads", [])]


def download(server: s3_server.S3Server, prefix: str, target) -> str:
    """Every object under `prefix` into the new local folder `target`."""
    os.makedirs(target)
    for name in list_keys(server, prefix):
        server.client().download_file(BUCKET, f"{prefix}/{name}", os.path.join(target, name))
    return str(target)
