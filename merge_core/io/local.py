"""Local (or mounted network) filesystems: pread/preadv in place, temp file + fsync + rename out."""

from __future__ import annotations

import os
import shutil
import uuid

from merge_core.errors import InputError
from merge_core.io.storage import ObjectWriter, Storage, check_plain_name

PARTIAL_SUFFIX = ".partial"


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
    read_back_proves = False
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
