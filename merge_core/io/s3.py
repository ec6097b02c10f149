"""The s3:// backend (boto3): ranged GETs in, multipart uploads out, conditional create for the index.

Settings come from the standard AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, AWS_REGION). With an endpoint set (an S3-compatible
store) addressing is path-style. botocore adds checksums only where the API requires them; the
objects written carry a CRC32 of their whole bytes that the writer computes and the store checks
(ObjectWriter.store_checked), unless the store refuses checksums. Messages name buckets and keys,
never credentials.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Iterator, TypeVar

import boto3
import botocore.loaders
import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError
from botocore.exceptions import ConnectionError as BotoConnectionError

from merge_core.errors import InputError, TransientStorageError
from merge_core.io.s3_writer import MAX_PARTS, MIN_PART_BYTES, UPLOADS_IN_FLIGHT, MultipartWriter, Refused
from merge_core.io.storage import ObjectWriter, Storage, StorageOptions, check_plain_name

RETRY_ATTEMPTS = 10  # botocore's standard mode backs off between them: enough for a busy store
NOT_FOUND = ("404", "NoSuchKey", "NotFound")
DENIED = ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")
PRECONDITION = ("412", "PreconditionFailed", "ConditionalRequestConflict")
T = TypeVar("T")


def split_s3_uri(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise InputError(uri, "has no bucket", "write it as s3://bucket/prefix")
    return bucket, prefix.strip("/")


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


_LOADER: list[botocore.loaders.Loader] = []  # one per process, made on first use
_LOADER_LOCK = threading.Lock()


def _session() -> boto3.session.Session:
    """A session of its own (credentials as the environment says now), over one loader of service
    models per process: a client made with a loader of its own reads botocore's data folders and
    the S3 model again, 0.15-0.5 s each time (more beside a thread importing torch), and a job
    makes one per storage, in the driver and in each worker."""
    core = botocore.session.get_session()
    with _LOADER_LOCK:
        if not _LOADER:
            _LOADER.append(botocore.loaders.create_loader(os.environ.get("AWS_DATA_PATH")))
        core.register_component("data_loader", _LOADER[0])
        session = boto3.session.Session(botocore_session=core)
        paths = _LOADER[0].search_paths  # each boto3 session appends its own data folder again
        paths[:] = list(dict.fromkeys(paths))
    return session


def make_client():
    # AWS_MAX_ATTEMPTS / AWS_RETRY_MODE in the environment (or the profile) win over our default.
    attempts = int(os.environ.get("AWS_MAX_ATTEMPTS", RETRY_ATTEMPTS))
    config = Config(
        retries={"mode": os.environ.get("AWS_RETRY_MODE", "standard"), "max_attempts": attempts},
        s3={"addressing_style": "path"} if _endpoint() else {},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        max_pool_connections=32,
        connect_timeout=10,
        read_timeout=120,
    )
    return _session().client("s3", config=config)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3Storage(Storage):
    def __init__(self, uri: str, options: StorageOptions):
        self.bucket, self.prefix = split_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.options = options
        self.endpoint = _endpoint()
        self.client = make_client()
        self.checksums = True  # objects carry a CRC32 of their whole bytes, until the store refuses one

    def copies_from(self, source: Storage) -> bool:
        """Whether the server can copy `source`'s objects here itself: S3 at the same endpoint (and,
        settings coming from one environment, with the same credentials)."""
        return isinstance(source, S3Storage) and source.endpoint == self.endpoint

    @property
    def upload_buffer_bytes(self) -> int:
        return self.options.part_size * (1 + UPLOADS_IN_FLIGHT)  # the part filling, and those in flight

    def check_object_size(self, nbytes: int) -> None:
        part_size = self.options.part_size
        if part_size < MIN_PART_BYTES:
            raise InputError("--part-size-mb", f"{part_size // 2**20} MiB is below S3's 5 MiB minimum part size",
                             "use --part-size-mb 5 or more")
        if nbytes > part_size * MAX_PARTS:
            raise InputError("--part-size-mb", f"a {nbytes}-byte object needs more than {MAX_PARTS} parts of "
                             f"{part_size // 2**20} MiB",
                             f"use --part-size-mb {-(-nbytes // MAX_PARTS // 2**20)} or more")

    def key(self, name: str) -> str:
        check_plain_name(name, self.uri)
        return f"{self.prefix}/{name}" if self.prefix else name

    def call(self, what: str, fn: Callable[..., T], refused: tuple[str, ...] = (), **kwargs) -> T:
        """One S3 request with botocore's retries; failures become our error kinds (an error code in
        `refused`: Refused)."""
        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            code = _code(exc)
            if code in refused:
                raise Refused(code) from None
            if code in NOT_FOUND:
                raise FileNotFoundError(f"{self.uri}: {what}") from None
            if code == "NoSuchBucket":
                raise InputError(f"s3://{self.bucket}", "bucket does not exist",
                                 "create the bucket or fix the URI") from None
            if code in DENIED:
                raise InputError(f"{self.uri} ({what})", f"access denied ({code})",
                                 "check the AWS credentials and the bucket policy") from None
            if code in PRECONDITION:
                raise FileExistsError(f"{self.uri}: {what}") from None
            raise TransientStorageError(f"{self.uri}: {what}: {code}: {exc.response['Error'].get('Message', '')}") \
                from None
        except (NoCredentialsError, PartialCredentialsError):
            raise InputError(self.uri, "no usable AWS credentials found",
                             "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role") \
                from None
        except (BotoConnectionError, BotoCoreError) as exc:
            raise TransientStorageError(f"{self.uri}: {what}: {type(exc).__name__}: {exc}") from None

    def exists(self, name: str) -> bool:
        try:
            self.size(name)
            return True
        except FileNotFoundError:
            return False

    def size(self, name: str) -> int:
        key = self.key(name)
        return self.call(f"HEAD {key}", self.client.head_object, Key=key)["ContentLength"]

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        key = self.key(name)
        what = f"GET {key} bytes {offset}-{offset + length - 1}"
        response = self.call(what, self.client.get_object, Key=key, Range=f"bytes={offset}-{offset + length - 1}")
        try:
            data = response["Body"].read()
        except (BotoCoreError, OSError) as exc:
            raise TransientStorageError(f"{self.uri}: {what}: {type(exc).__name__}: {exc}") from None
        if len(data) != length:
            raise InputError(self.describe(name), f"expected {length} bytes at offset {offset}, got {len(data)}",
                             "the object changed or was truncated while being read; restore it and re-run")
        return data

    def _keys(self, **listing) -> Iterator[str]:
        """Every key under the prefix, page by page (with Delimiter="/", only direct children)."""
        prefix = f"{self.prefix}/" if self.prefix else ""
        token: dict = {}
        while True:
            page = self.call(f"LIST {prefix}", self.client.list_objects_v2, Prefix=prefix, **listing, **token)
            yield from (o["Key"] for o in page.get("Contents", []))
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def list_names(self) -> list[str]:
        skip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(key[skip:] for key in self._keys(Delimiter="/") if key[skip:])

    def open_writer(self, name: str) -> ObjectWriter:
        return MultipartWriter(self, self.key(name))

    def delete(self, name: str) -> None:
        key = self.key(name)
        self.call(f"DELETE {key}", self.client.delete_object, Key=key)

    def rename(self, old: str, new: str) -> None:
        """S3 has no rename: a server-side copy (multipart above 5 GB, done by boto3), then a delete."""
        source, target = self.key(old), self.key(new)
        try:
            self.client.copy({"Bucket": self.bucket, "Key": source}, self.bucket, target)
        except ClientError as exc:
            raise TransientStorageError(f"{self.uri}: COPY {source} to {target}: {_code(exc)}") from None
        except (BotoConnectionError, BotoCoreError) as exc:
            raise TransientStorageError(f"{self.uri}: COPY {source} to {target}: {type(exc).__name__}") from None
        self.delete(old)

    def remove_tree(self) -> None:
        for key in list(self._keys()):
            self.call(f"DELETE {key}", self.client.delete_object, Key=key)

    def open_uploads(self) -> list[tuple[str, str]]:
        """(key, upload id) of unfinished multipart uploads of objects directly under the prefix
        (not deeper: other jobs may be writing below it)."""
        prefix = f"{self.prefix}/" if self.prefix else ""
        uploads, markers = [], {}
        while True:
            page = self.call(f"LIST uploads {prefix}", self.client.list_multipart_uploads, Prefix=prefix, **markers)
            uploads += [(u["Key"], u["UploadId"]) for u in page.get("Uploads", [])
                        if "/" not in u["Key"][len(prefix):]]
            if not page.get("IsTruncated"):
                return uploads
            markers = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    def discard_incomplete(self) -> None:
        for key, upload_id in self.open_uploads():
            self.call(f"ABORT upload {key}", self.client.abort_multipart_upload, Key=key, UploadId=upload_id)
