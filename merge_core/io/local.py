"""Local (or mounted network) filesystems: pread/preadv in place, temp file + fsync + rename out."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from typing import Iterator

from merge_core.errors import InputError
from merge_core.io.storage import ObjectWriter, Storage, check_plain_name

PARTIAL_SUFFIX = ".partial"

# What the system says when the output cannot take a file, as the user's mistake and its fix.
_NOT_WRITABLE = ("is not writable: permission denied", "choose a folder you may write to as --output, or fix its "
                 "permissions")
_FULL = "free space there, then run the same command with --resume"
OUTPUT_ERRORS = {
    errno.EROFS: ("is on a read-only file system", "choose a writable --output"),
    errno.EACCES: _NOT_WRITABLE,
    errno.EPERM: _NOT_WRITABLE,
    errno.ENOSPC: ("ran out of space on its device", _FULL),
    errno.EDQUOT: ("is over its disk quota", _FULL),
    errno.ENOTDIR: ("lies inside a file, not a folder", "choose an --output whose parents are folders"),
    errno.EISDIR: ("holds a folder where a file is written", "remove that folder, or choose another --output"),
}


def output_error(exc: OSError, subject: str) -> InputError | None:
    """The one-line error for an OS error at the output, naming `subject` (never a temp file)."""
    known = OUTPUT_ERRORS.get(exc.errno)
    return InputError(subject, *known) if known else None


@contextlib.contextmanager
def _writing(subject: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        translated = output_error(exc, subject)
        if translated is None:
            raise
        raise translated from exc


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
        with _writing(final_path):
            self._file = open(self._temp, "xb")
        self._done = False

    def write(self, data: bytes | memoryview) -> None:
        with _writing(self._final):
            self._file.write(data)

    def commit(self, exclusive: bool = False) -> None:
        with _writing(self._final):
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

    def check_writable(self) -> None:
        """Refuse, before anything is written, an output that cannot take a file: a file in its
        place, a read-only or full file system, no permission. Leaves no trace."""
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise InputError(self.root, "is a file, not a folder", "choose a folder as --output")
        created = not os.path.exists(self.root)
        with _writing(self.root):
            os.makedirs(self.root, exist_ok=True)
            probe = os.path.join(self.root, f".write-probe-{uuid.uuid4().hex[:12]}{PARTIAL_SUFFIX}")
            with open(probe, "xb") as f:
                f.write(b"\0")
            os.unlink(probe)
            if created:
                os.rmdir(self.root)

    def open_writer(self, name: str) -> ObjectWriter:
        with _writing(self.root):
            os.makedirs(self.root, exist_ok=True)
        return _LocalWriter(self._path(name))

    def delete(self, name: str) -> None:
        try:
            with _writing(self._path(name)):
                os.unlink(self._path(name))
        except FileNotFoundError:
            pass

    def remove_tree(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def rename(self, old: str, new: str) -> None:
        with _writing(self._path(new)):
            os.replace(self._path(old), self._path(new))
            _fsync_directory(self.root)

    def discard_incomplete(self) -> None:
        if os.path.isdir(self.root):
            for n in os.listdir(self.root):
                if n.startswith(".") and n.endswith(PARTIAL_SUFFIX):
                    os.unlink(os.path.join(self.root, n))
