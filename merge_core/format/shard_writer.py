"""A safetensors file written as a stream: header first, then each tensor's bytes in order.

The layout is fixed up front from the tensors' dtypes and shapes, so nothing is buffered or
rewritten; the writer checks that exactly the promised bytes arrive, writes them and hashes them
on two threads of their own (behind the caller, and beside each other: the hash need not wait
for the store, nor the store for the hash), and publishes the file only when every tensor is
complete.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from merge_core.format.header import TensorInfo, encode_header
from merge_core.io.hashing import DEFAULT_DIGEST, TimedDigest
from merge_core.io.pipeline import Behind, Window
from merge_core.io.storage import ObjectWriter


class ShardStreamWriter:
    def __init__(self, writer: ObjectWriter, tensors: Sequence[tuple[str, str, Sequence[int]]],
                 metadata: Mapping[str, str] | None, window: Window | None = None, digest: str = DEFAULT_DIGEST):
        """`window`: a budget of queued bytes shared with other writers (the outputs of one task);
        by default each of its two threads has its own."""
        header, self.layout = encode_header(tensors, metadata)
        self._writer = writer
        self._behind = Behind("write", window=window)
        self._hashing = Behind("hash-output", window=window)
        self._digest = TimedDigest(digest)
        self._size = 0
        self._data_written = 0  # bytes of tensor data so far
        self._header: bytes | None = header  # until the first bytes after it, or offer_header()
        self.data_start = len(header)

    def _emit(self, data: bytes | memoryview, source: tuple | None = None) -> None:
        if self._header is not None:
            self._emit_header()
        if source is None:
            self._behind.submit(self._writer.write, data)
        else:
            storage, name, offset = source
            self._behind.submit(lambda d: self._writer.write_copy(d, storage, name, offset), data)
        self._hashing.submit(self._digest.update, data)
        self._size += len(data)

    def _emit_header(self, source: tuple | None = None) -> None:
        header, self._header = self._header, None
        self._emit(header, source)

    def offer_header(self, raw: bytes | memoryview, storage, name: str) -> None:
        """The base shard's own header, `raw`, as read from `storage`: where it is this shard's header
        byte for byte (nothing renamed, resized or added), the store may copy it with the tensors
        after it, and an untouched shard is copied whole."""
        if self._header is not None and bytes(raw) == self._header:
            self._emit_header((storage, name, 0))

    def write_data(self, data: bytes | memoryview, source: tuple | None = None) -> None:
        """Raw tensor bytes, continuing where the previous call stopped (may span tensors). `source`:
        (storage, name, offset) where the same bytes lie, which the store may copy itself."""
        end = self.layout[-1].end if self.layout else 0
        if self._data_written + len(data) > end:
            raise RuntimeError(f"{len(data)} bytes would run past the end of the shard's data ({end} bytes)")
        self._emit(data, source)
        self._data_written += len(data)

    def write_tensor(self, info: TensorInfo, data: bytes | memoryview) -> None:
        """One whole tensor, which must be the next one in the layout."""
        if self._data_written != info.start or len(data) != info.nbytes:
            raise RuntimeError(f"tensor {info.name}: got {len(data)} bytes at data offset {self._data_written}, "
                               f"expected {info.nbytes} at {info.start}")
        self.write_data(data)

    def commit(self) -> tuple[int, str]:
        """Publish the file; returns (size, tagged digest)."""
        end = self.layout[-1].end if self.layout else 0
        if self._data_written != end:
            raise RuntimeError(f"shard incomplete: {self._data_written} of {end} data bytes written")
        if self._header is not None:  # a shard without tensors
            self._emit_header()
        self._behind.drain()
        self._hashing.drain()
        self._behind.close()
        self._hashing.close()
        self._writer.commit()
        return self._size, self._digest.value()

    @property
    def bytes_copied(self) -> int:
        """Bytes the store copied itself rather than receiving them (after commit)."""
        return self._writer.bytes_copied

    @property
    def store_checked(self) -> bool:
        """Whether the store verified the whole object's checksum at commit (io.storage.ObjectWriter)."""
        return self._writer.store_checked

    @property
    def hash_seconds(self) -> float:
        return self._digest.seconds

    def abort(self) -> None:
        self._behind.close()
        self._hashing.close()
        self._writer.abort()
