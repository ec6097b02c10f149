"""Where checkpoints live: the one interface every storage backend implements.

Every object is addressed by a plain file name inside a root (a directory, an S3 prefix).
Writers publish atomically: bytes go to a temporary object and appear under their final name
only on commit, so a reader never sees half a file under a real name. The backends are
merge_core.io.local and merge_core.io.s3; merge_core.io.registry opens one from a URI.
"""

from __future__ import annotations

import hashlib
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator

from merge_core.errors import InputError

COPY_CHUNK_BYTES = 16 * 1024 * 1024
DEFAULT_PART_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class StorageOptions:
    part_size: int = DEFAULT_PART_BYTES  # multipart upload part size for object stores


def check_plain_name(name: str, where: str) -> str:
    """Object names come from index files we do not trust: keep every access inside the root."""
    if not name or "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
        raise InputError(where, f"file name {name!r} is not a plain file name",
                         "an index may only name files in its own directory; fix the weight_map")
    return name


class ObjectWriter(ABC):
    """Sequential writer whose bytes appear under the final name only after commit()."""

    @abstractmethod
    def write(self, data: bytes | memoryview) -> None: ...

    # Bytes the store copied itself (write_copy), which this writer never sent.
    bytes_copied: int = 0
    # After commit: whether the store itself checked that it holds every byte written (a checksum of
    # the whole object it verified), so that reading the object back would prove nothing more.
    store_checked: bool = False

    def write_copy(self, data: bytes | memoryview, source: "Storage", name: str, offset: int) -> None:
        """Write `data`, which are also bytes `offset`... of `source`'s object `name`: a store that can
        copy them itself (S3's UploadPartCopy) may do that instead of sending them. By default, written."""
        self.write(data)

    @abstractmethod
    def commit(self, exclusive: bool = False) -> None:
        """Publish. With exclusive=True, fail with FileExistsError if the name already exists."""

    @abstractmethod
    def abort(self) -> None: ...

    def __enter__(self) -> "ObjectWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


class Storage(ABC):
    uri: str
    # Whether reading a just-written object back proves what the store holds. An object store
    # answers from its servers; a local file answers from this machine's page cache, which
    # proves little beyond what fsync already promised, at the cost of a second full pass.
    read_back_proves: bool = True

    @property
    def upload_buffer_bytes(self) -> int:
        """Memory one writer holds while it writes here, whatever the object's size: the parts an
        object store's multipart upload fills and sends; nothing for a file."""
        return 0

    def copy_source(self) -> "Storage":
        """The storage itself, under whatever wraps it (CountedReads): what a writer may copy from."""
        return self

    def describe(self, name: str) -> str:
        """The name as a user would type it, for messages."""
        return f"{self.uri.rstrip('/')}/{name}"

    def check_writable(self) -> None:
        """Raise InputError if this location cannot take files; by default the first write tells."""

    def check_object_size(self, nbytes: int) -> None:
        """Refuse (InputError) before any write an object this backend could not store, such as
        one that needs more multipart parts than S3 allows. Local files take any size."""

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def size(self, name: str) -> int:
        """Size in bytes; FileNotFoundError if absent."""

    @abstractmethod
    def read_range(self, name: str, offset: int, length: int) -> bytes: ...

    def read_into(self, name: str, offset: int, view: memoryview) -> None:
        """Fill `view` with the bytes at `offset` (backends that can read in place override this)."""
        view[:] = self.read_range(name, offset, len(view))

    @abstractmethod
    def list_names(self) -> list[str]:
        """Plain names of the objects directly under the root, partial uploads excluded."""

    @abstractmethod
    def open_writer(self, name: str) -> ObjectWriter: ...

    @abstractmethod
    def delete(self, name: str) -> None: ...

    @abstractmethod
    def rename(self, old: str, new: str) -> None:
        """Give an object another name, replacing whatever had it."""

    @abstractmethod
    def remove_tree(self) -> None:
        """Delete everything under the root, sub-prefixes included."""

    @abstractmethod
    def discard_incomplete(self) -> None:
        """Remove what writers that never committed left behind (a killed process)."""

    def read_bytes(self, name: str) -> bytes:
        return self.read_range(name, 0, self.size(name))

    def iter_range(self, name: str, offset: int, length: int, chunk: int = COPY_CHUNK_BYTES) -> Iterator[bytes]:
        end = offset + length
        while offset < end:
            step = min(chunk, end - offset)
            yield self.read_range(name, offset, step)
            offset += step

    def write_bytes(self, name: str, data: bytes, exclusive: bool = False) -> None:
        with self.open_writer(name) as writer:
            writer.write(data)
            writer.commit(exclusive=exclusive)


class CountedReads:
    """A storage whose reads are counted as they return: what a task fetched from it, measured
    where the bytes arrive (one read of a base shard for several outputs shows here as the shard's
    size, not a multiple of it). Everything else is the storage's own."""

    def __init__(self, storage: Storage):
        self._storage = storage
        self._lock = threading.Lock()
        self.bytes_read = 0

    def __getattr__(self, name: str):
        return getattr(self._storage, name)

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_read += nbytes

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        data = self._storage.read_range(name, offset, length)
        self._count(len(data))
        return data

    def read_into(self, name: str, offset: int, view: memoryview) -> None:
        self._storage.read_into(name, offset, view)
        self._count(len(view))


def copy_object(src: Storage, dst: Storage, name: str) -> tuple[int, str]:
    """Stream one object from src to dst under the same name; returns (size, sha256)."""
    digest = hashlib.sha256()
    size = src.size(name)
    with dst.open_writer(name) as writer:
        for chunk in src.iter_range(name, 0, size):
            digest.update(chunk)
            writer.write(chunk)
        writer.commit()
    return size, digest.hexdigest()
