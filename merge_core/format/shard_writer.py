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
from merge_core.io.hashing import TimedSha256
from merge_core.io.pipeline import Behind, Window
from merge_core.io.storage import ObjectWriter


class ShardStreamWriter:
    def __init__(self, writer: ObjectWriter, tensors: Sequence[tuple[str, str, Sequence[int]]],
                 metadata: Mapping[str, str] | None, window: Window | None = None):
        """`window`: a budget of queued bytes shared with other writers (the outputs of one task);
        by default each of its two threads has its own."""
        header, self.layout = encode_header(tensors, metadata)
        self._writer = writer
        self._behind = Behind("write", window=window)
        self._hashing = Behind("hash-output", window=window)
        self._sha = TimedSha256()
        self._size = 0
        self._data_written = 0  # bytes of tensor data so far
        self._emit(header)
        self.data_start = len(header)

    def _emit(self, data: bytes | memoryview) -> None:
        self._behind.submit(self._writer.write, data)
        self._hashing.submit(self._sha.update, data)
        self._size += len(data)

    def write_data(self, data: bytes | memoryview) -> None:
        """Raw tensor bytes, continuing where the previous call stopped (may span tensors)."""
        end = self.layout[-1].end if self.layout else 0
        if self._data_written + len(data) > end:
            raise RuntimeError(f"{len(data)} bytes would run past the end of the shard's data ({end} bytes)")
        self._emit(data)
        self._data_written += len(data)

    def write_tensor(self, info: TensorInfo, data: bytes | memoryview) -> None:
        """One whole tensor, which must be the next one in the layout."""
        if self._data_written != info.start or len(data) != info.nbytes:
            raise RuntimeError(f"tensor {info.name}: got {len(data)} bytes at data offset {self._data_written}, "
                               f"expected {info.nbytes} at {info.start}")
        self.write_data(data)

    def commit(self) -> tuple[int, str]:
        """Publish the file; returns (size, sha256)."""
        end = self.layout[-1].end if self.layout else 0
        if self._data_written != end:
            raise RuntimeError(f"shard incomplete: {self._data_written} of {end} data bytes written")
        self._behind.drain()
        self._hashing.drain()
        self._behind.close()
        self._hashing.close()
        self._writer.commit()
        return self._size, self._sha.hexdigest()

    @property
    def hash_seconds(self) -> float:
        return self._sha.seconds

    def abort(self) -> None:
        self._behind.close()
        self._hashing.close()
        self._writer.abort()
