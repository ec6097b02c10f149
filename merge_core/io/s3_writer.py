"""The s3:// backend's object writer: multipart uploads while the object fills, ranges the server
copies itself (UploadPartCopy, CopyObject), and a CRC32 of the whole object that the store checks.
"""

from __future__ import annotations

import base64
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Protocol

from merge_core.errors import InputError
from merge_core.io.storage import ObjectWriter, Storage, StorageOptions

MIN_PART_BYTES = 5 * 1024 * 1024  # S3's own floor for every part but the last
MAX_PARTS = 10_000
UPLOADS_IN_FLIGHT = 2  # parts uploading while the next one fills: bounds memory to 3 parts
COPY_PART_BYTES = 256 * 1024 * 1024  # a server-side copied range goes in parts of this, several at once
COPIES_IN_FLIGHT = 4  # they carry no bytes of ours: as many as the server copies well side by side
MAX_COPY_OBJECT_BYTES = 5 * 1024**3  # CopyObject's limit; larger objects are copied in parts
# What an S3-compatible store answers to a checksum it does not take (then objects go without one,
# and the read-back downloads them again).
CHECKSUMS_REFUSED = ("400", "501", "InvalidArgument", "InvalidRequest", "NotImplemented")


class Refused(Exception):
    """The store refused what the request asked for (its error code)."""


def _crc32_text(crc: int) -> str:
    """A CRC32 as S3's checksum headers carry it: its 4 bytes, big-endian, in base64."""
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


class Bucket(Protocol):
    """What the writer needs of the s3:// backend (io.s3.S3Storage), for its own objects and for
    the objects it copies from."""
    uri: str
    bucket: str
    client: Any
    options: StorageOptions
    checksums: bool

    def key(self, name: str) -> str: ...

    def call(self, what: str, fn: Callable, refused: tuple[str, ...] = (), **kwargs) -> Any: ...

    def copies_from(self, source: Storage) -> bool: ...


class MultipartWriter(ObjectWriter):
    """Bytes are cut into parts of options.part_size and uploaded while the next part fills.
    An object smaller than one part is sent as one PUT. Nothing is visible until commit, and
    abort() removes the upload so that no parts are left dangling (and billed).

    Bytes given with write_copy() from an object of the same S3 endpoint are not sent: contiguous
    ones are gathered into one range, which the server copies itself (UploadPartCopy with a source
    range, in parts of at most COPY_PART_BYTES; CopyObject when the range is a whole object of at
    most 5 GiB and nothing else was written). Every part but the last must hold 5 MiB: the bytes
    written before a copy that are fewer are topped up from the copy's own start, and a copied
    range shorter than that is read and sent instead (both at most 5 MiB read again).

    Every object sent carries the CRC32 of all its bytes (FULL_OBJECT: each part's checksum, the
    server's own for a copied part, and the whole object's checked by the store at completion), so
    that the store itself proves it holds the bytes that were hashed, and the read-back need not
    download them again (`store_checked`). A store that refuses checksums gets objects without."""

    def __init__(self, storage: Bucket, key: str):
        self._s3, self._key = storage, key
        self._part_size = storage.options.part_size
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[Future] = []
        self._pool: ThreadPoolExecutor | None = None
        self._copies: ThreadPoolExecutor | None = None
        self._copy: list | None = None  # [source storage, name, offset, length]: the range gathered so far
        self._done = False
        self._crc = 0  # of every byte of the object so far, sent or copied
        self._checksums = storage.checksums
        self.store_checked = False

    def write(self, data: bytes | memoryview) -> None:
        self._crc = zlib.crc32(data, self._crc)
        self._flush_copy()
        self._buffer += data
        self._send_full_parts()

    def _send_full_parts(self) -> None:
        while len(self._buffer) >= self._part_size:
            part = bytes(self._buffer[:self._part_size])
            del self._buffer[:self._part_size]
            self._send_part(part)

    def write_copy(self, data: bytes | memoryview, source: Storage, name: str, offset: int) -> None:
        origin = source.copy_source()
        if not self._s3.copies_from(origin):
            self.write(data)
            return
        self._crc = zlib.crc32(data, self._crc)
        pending = self._copy
        if pending and pending[0] is origin and pending[1] == name and pending[2] + pending[3] == offset:
            pending[3] += len(data)
        else:
            self._flush_copy()
            self._copy = [origin, name, offset, len(data)]

    def _flush_copy(self, last: bool = False) -> None:
        if self._copy is None:
            return
        origin, name, offset, length = self._copy
        self._copy = None
        if self._buffer and len(self._buffer) < MIN_PART_BYTES:  # too short for a part: top it up
            take = min(MIN_PART_BYTES - len(self._buffer), length)
            self._buffer += origin.read_range(name, offset, take)
            offset, length = offset + take, length - take
        if length < MIN_PART_BYTES and not (last and length):
            self._buffer += origin.read_range(name, offset, length)
            self._send_full_parts()
            return
        if self._buffer:
            self._send_part(bytes(self._buffer))
            self._buffer.clear()
        source = {"Bucket": origin.bucket, "Key": origin.key(name)}
        count = -(-length // COPY_PART_BYTES)  # parts of equal size: none of them short of 5 MiB
        bounds = [offset + length * i // count for i in range(count + 1)]
        for start, end in zip(bounds, bounds[1:]):
            self._submit(self._copy_part, source, start, end)
        self.bytes_copied += length

    def _submit(self, fn, *args) -> None:
        if self._upload_id is None:
            self._upload_id = self._create_upload()
            self._pool = ThreadPoolExecutor(UPLOADS_IN_FLIGHT)
            self._copies = ThreadPoolExecutor(COPIES_IN_FLIGHT)
        number = len(self._parts) + 1
        if number > MAX_PARTS:
            raise InputError(self._s3.uri, f"{self._key} needs more than {MAX_PARTS} parts",
                             "raise --part-size-mb")
        pool = self._copies if fn == self._copy_part else self._pool
        self._parts.append(pool.submit(fn, number, *args))

    def _send_part(self, data: bytes) -> None:
        # Backpressure: wait for the oldest in-flight part before queueing another.
        if len(self._parts) >= UPLOADS_IN_FLIGHT:
            self._parts[-UPLOADS_IN_FLIGHT].result()
        self._submit(self._upload_part, data)

    def _create_upload(self) -> str:
        what, create = f"CREATE upload {self._key}", self._s3.client.create_multipart_upload
        if self._checksums:
            try:
                return self._s3.call(what, create, refused=CHECKSUMS_REFUSED, Key=self._key,
                                     ChecksumAlgorithm="CRC32", ChecksumType="FULL_OBJECT")["UploadId"]
            except Refused:
                self._checksums = self._s3.checksums = False
        return self._s3.call(what, create, Key=self._key)["UploadId"]

    def _upload_part(self, number: int, data: bytes) -> dict:
        checksum = {"ChecksumCRC32": _crc32_text(zlib.crc32(data))} if self._checksums else {}
        response = self._s3.call(f"PUT part {number} of {self._key}", self._s3.client.upload_part, Key=self._key,
                                 UploadId=self._upload_id, PartNumber=number, Body=data, **checksum)
        return {"PartNumber": number, "ETag": response["ETag"], **checksum}

    def _copy_part(self, number: int, source: dict, start: int, end: int) -> dict:
        response = self._s3.call(f"COPY part {number} of {self._key} from {source['Key']} bytes {start}-{end - 1}",
                                 self._s3.client.upload_part_copy, Key=self._key, UploadId=self._upload_id,
                                 PartNumber=number, CopySource=source, CopySourceRange=f"bytes={start}-{end - 1}")
        result = response["CopyPartResult"]
        return {"PartNumber": number, "ETag": result["ETag"],
                **({"ChecksumCRC32": result["ChecksumCRC32"]} if "ChecksumCRC32" in result else {})}

    def _copies_whole_object(self, exclusive: bool) -> bool:
        """Nothing but one copied range, which is a whole object CopyObject can copy: copy it so."""
        if self._copy is None or self._upload_id is not None or self._buffer or exclusive:
            return False
        origin, name, offset, length = self._copy
        if offset != 0 or length > MAX_COPY_OBJECT_BYTES or origin.size(name) != length:
            return False
        self._s3.call(f"COPY {origin.key(name)} to {self._key}", self._s3.client.copy_object, Key=self._key,
                      CopySource={"Bucket": origin.bucket, "Key": origin.key(name)})
        self.bytes_copied += length
        self._copy = None
        return True

    def commit(self, exclusive: bool = False) -> None:
        condition = {"IfNoneMatch": "*"} if exclusive else {}
        if not self._copies_whole_object(exclusive):
            self._flush_copy(last=True)
            whole = {"ChecksumCRC32": _crc32_text(self._crc)} if self._checksums else {}
            if self._upload_id is None:
                self._put(bytes(self._buffer), whole, condition)
            else:
                if self._buffer:
                    self._send_part(bytes(self._buffer))
                parts = [f.result() for f in self._parts]
                if whole and all("ChecksumCRC32" in p for p in parts):
                    whole["ChecksumType"] = "FULL_OBJECT"
                else:  # a copied part the store gave no checksum for: the object goes without a whole one
                    whole = {}
                self._s3.call(f"COMPLETE upload {self._key}", self._s3.client.complete_multipart_upload,
                              Key=self._key, UploadId=self._upload_id, MultipartUpload={"Parts": parts},
                              **whole, **condition)
                self._shutdown(wait=True)
            self.store_checked = bool(whole)
        self._buffer.clear()
        self._done = True

    def _put(self, data: bytes, checksum: dict, condition: dict) -> None:
        what, put = f"PUT {self._key}", self._s3.client.put_object
        if checksum:
            try:
                self._s3.call(what, put, refused=CHECKSUMS_REFUSED, Key=self._key, Body=data, **checksum, **condition)
                return
            except Refused:
                self._s3.checksums = False
                checksum.clear()
        self._s3.call(what, put, Key=self._key, Body=data, **condition)

    def _shutdown(self, wait: bool, cancel: bool = False) -> None:
        for pool in (self._pool, self._copies):
            if pool is not None:
                pool.shutdown(wait=wait, cancel_futures=cancel)

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._buffer.clear()
        self._copy = None
        self._shutdown(wait=True, cancel=True)
        if self._upload_id is not None:
            self._s3.call(f"ABORT upload {self._key}", self._s3.client.abort_multipart_upload, Key=self._key,
                          UploadId=self._upload_id)
