"""Where checkpoints live: one small interface, a backend per URI scheme.

Every object is addressed by a plain file name inside a root (a directory or, with issue 4,
an S3 prefix). Writers publish atomically: bytes go to a temporary object and appear under
their final name only on commit, so a reader never sees half a file under a real name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator

from merge_core.errors import InputError

COPY_CHUNK_BYTES = 16 * 1024 * 1024
PARTIAL_SUFFIX = ".partial"
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

    def describe(self, name: str) -> str:
        """The name as a user would type it, for messages."""
        return f"{self.uri.rstrip('/')}/{name}"

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


def _fsync_directory(path: str) -> None:
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class _LocalWriter(ObjectWriter):
    def __init__(self, final_path: str):
        self._final = final_path
        directory, base = os.path.split(final_path)
        self._temp = os.path.join(directory, f".{base}.{uuid.uuid4().hex[:12]}{PARTIAL_SUFFIX}")
        self._file = open(self._temp, "xb")
        self._done = False

    def write(self, data: bytes | memoryview) -> None:
        self._file.write(data)

    def commit(self, exclusive: bool = False) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if exclusive:
            self._claim()
        else:
            os.replace(self._temp, self._final)
        _fsync_directory(os.path.dirname(self._final))  # the rename is durable once the entry is
        self._done = True

    def _claim(self) -> None:
        """Publish under a name that must not exist yet, atomically where the filesystem allows."""
        try:
            os.link(self._temp, self._final)  # refuses an existing name, unlike rename()
            os.unlink(self._temp)
        except FileExistsError:
            raise
        except OSError:  # no hard links here (some FUSE or SMB mounts): claim the name, then replace it
            os.close(os.open(self._final, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            os.replace(self._temp, self._final)

    def abort(self) -> None:
        if self._done:
            return
        self._file.close()
        try:
            os.unlink(self._temp)
        except FileNotFoundError:
            pass
        self._done = True


class LocalStorage(Storage):
    def __init__(self, root: str):
        self.root = os.path.realpath(os.path.expanduser(root))
        self.uri = self.root

    def _path(self, name: str) -> str:
        return os.path.join(self.root, check_plain_name(name, self.uri))

    def exists(self, name: str) -> bool:
        return os.path.isfile(self._path(name))

    def size(self, name: str) -> int:
        path = self._path(name)
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        return os.path.getsize(path)

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        with open(self._path(name), "rb") as f:
            data = os.pread(f.fileno(), length, offset)
        if len(data) != length:
            raise InputError(self.describe(name), f"expected {length} bytes at offset {offset}, got {len(data)}",
                             "the file changed or was truncated while being read; restore it and re-run")
        return data

    def read_into(self, name: str, offset: int, view: memoryview) -> None:
        done = 0
        with open(self._path(name), "rb") as f:
            while done < len(view):
                got = os.preadv(f.fileno(), [view[done:]], offset + done)
                if got == 0:
                    raise InputError(self.describe(name), f"expected {len(view)} bytes at offset {offset}, got {done}",
                                     "the file changed or was truncated while being read; restore it and re-run")
                done += got

    def list_names(self) -> list[str]:
        if not os.path.isdir(self.root):
            return []
        return sorted(n for n in os.listdir(self.root)
                      if os.path.isfile(os.path.join(self.root, n))
                      and not (n.startswith(".") and n.endswith(PARTIAL_SUFFIX)))

    def open_writer(self, name: str) -> ObjectWriter:
        os.makedirs(self.root, exist_ok=True)
        return _LocalWriter(self._path(name))

    def delete(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            pass

    def remove_tree(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def rename(self, old: str, new: str) -> None:
        os.replace(self._path(old), self._path(new))
        _fsync_directory(self.root)

    def discard_incomplete(self) -> None:
        if os.path.isdir(self.root):
            for n in os.listdir(self.root):
                if n.startswith(".") and n.endswith(PARTIAL_SUFFIX):
                    os.unlink(os.path.join(self.root, n))


def open_storage(uri: str, options: StorageOptions = StorageOptions()) -> Storage:
    if uri.startswith("s3://"):
        from merge_core.s3_storage import S3Storage  # boto3 loads only where S3 is used
        return S3Storage(uri, options)
    if "://" in uri:
        raise InputError(uri, f"unsupported URI scheme {uri.split('://')[0]!r}",
                         "use a local path or s3://bucket/prefix")
    return LocalStorage(uri)


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

