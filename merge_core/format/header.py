"""The safetensors file format: dtypes, header parsing with every check up front, header encoding.

Layout: 8-byte little-endian header length N, N bytes of JSON, then the tensors' bytes.
Offsets in the JSON are relative to the end of the header. We parse it ourselves so that a
worker can read one tensor by offset through any storage backend, and so that a malformed
file is refused from its header, before any memory is allocated for its tensors.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from dataclasses import dataclass
from typing import Mapping, Sequence

from merge_core.errors import InputError

# Same limit as the safetensors library: a header larger than this is not a real checkpoint.
MAX_HEADER_BYTES = 100_000_000
LENGTH_PREFIX_BYTES = 8
METADATA_KEY = "__metadata__"

# Bytes per element for every dtype the safetensors format defines with whole bytes.
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}
# The dtypes a LoRA delta can be fused into (quantized or integer bases cannot take one).
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# Float dtypes as unsigned integers, with the exponent bits that mark NaN and Inf when all set.
_EXPONENT_MASKS = {"F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80), "F32": ("<u4", 0x7F800000),
                   "F64": ("<u8", 0x7FF0000000000000)}


def count_nonfinite(data: bytes | bytearray | memoryview, dtype: str) -> int:
    """NaN and Inf elements in raw little-endian float data, read from the bits (no torch)."""
    import numpy

    layout, mask = _EXPONENT_MASKS[dtype]
    bits = numpy.frombuffer(data, dtype=layout)
    return int(numpy.count_nonzero((bits & numpy.array(mask, dtype=layout)) == mask))


@dataclass(frozen=True, kw_only=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # relative to the start of the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ShardHeader:
    tensors: tuple[TensorInfo, ...]  # in file order
    metadata: Mapping[str, str] | None
    data_start: int  # absolute offset of the first tensor byte
    file_size: int

    def tensor(self, name: str) -> TensorInfo:
        return self._tensors[name]

    @functools.cached_property
    def _tensors(self) -> dict[str, TensorInfo]:
        return {info.name: info for info in self.tensors}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)


def header_length(prefix: bytes, file_size: int, where: str) -> int:
    """Validate the 8-byte length prefix and return the JSON header's length."""
    if file_size < LENGTH_PREFIX_BYTES or len(prefix) < LENGTH_PREFIX_BYTES:
        raise InputError(where, f"file is {file_size} bytes, too short to be safetensors",
                         "the file is truncated or not safetensors; re-download or re-save it")
    (length,) = struct.unpack("<Q", prefix[:LENGTH_PREFIX_BYTES])
    if length > MAX_HEADER_BYTES:
        raise InputError(where, f"header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit",
                         "the file is corrupt or not safetensors; re-save it with safetensors")
    if LENGTH_PREFIX_BYTES + length > file_size:
        raise InputError(where, f"header length {length} runs past the end of the {file_size}-byte file",
                         "the file is truncated; re-download or re-save it")
    return length


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _tensor_info(name: str, entry: object, where: str) -> TensorInfo:
    subject = f"{where}: tensor {name}"
    fix = "the file is corrupt; re-save it with safetensors"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise InputError(subject, "header entry lacks dtype, shape or data_offsets", fix)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise InputError(subject, f"unknown dtype {dtype!r}",
                         f"supported dtypes: {', '.join(DTYPE_BYTES)}; convert the checkpoint to one of them")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise InputError(subject, f"shape {shape!r} is not a list of non-negative integers", fix)
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]):
        raise InputError(subject, f"data_offsets {offsets!r} are not [begin, end] with begin <= end", fix)
    info = TensorInfo(name=name, dtype=dtype, shape=tuple(shape), start=offsets[0], end=offsets[1])
    expected = info.numel * DTYPE_BYTES[dtype]
    if expected != info.nbytes:
        raise InputError(subject, f"{dtype}{list(shape)} needs {expected} bytes but data_offsets span {info.nbytes}",
                         fix)
    return info


def parse_header(raw: bytes, file_size: int, where: str) -> ShardHeader:
    """Parse and check a header. `raw` is the JSON bytes (after the 8-byte prefix)."""
    try:
        parsed = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(where, f"header is not valid JSON ({exc})",
                         "the file is corrupt or not safetensors; re-save it with safetensors") from None
    if not isinstance(parsed, dict):
        raise InputError(where, "header is not a JSON object", "re-save the file with safetensors")
    metadata = parsed.pop(METADATA_KEY, None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise InputError(where, "__metadata__ is not a map of strings to strings", "re-save the file with safetensors")

    infos = sorted((_tensor_info(name, entry, where) for name, entry in parsed.items()),
                   key=lambda t: (t.start, t.end))
    data_start = LENGTH_PREFIX_BYTES + len(raw)
    data_size = file_size - data_start
    position = 0
    for info in infos:
        if info.start != position:
            kind = "overlaps the previous tensor" if info.start < position else "leaves a gap before it"
            raise InputError(f"{where}: tensor {info.name}", f"data_offsets {[info.start, info.end]} {kind}",
                             "the file is corrupt; re-save it with safetensors")
        position = info.end
    if position != data_size:
        what = (f"tensors end at data offset {position} but the file holds {data_size} data bytes"
                if position > data_size else f"{data_size - position} trailing bytes after the last tensor")
        fix = ("the file is truncated; re-download or re-save it" if position > data_size
               else "the file is corrupt; re-save it with safetensors")
        raise InputError(where, what, fix)
    return ShardHeader(tuple(infos), metadata, data_start, file_size)


def encode_header(tensors: Sequence[tuple[str, str, Sequence[int]]],
                  metadata: Mapping[str, str] | None) -> tuple[bytes, list[TensorInfo]]:
    """Header bytes (prefix included) for tensors laid out contiguously in the given order.

    The JSON is padded with spaces to a multiple of 8 bytes, as the safetensors library does,
    so that every tensor starts aligned.
    """
    body: dict[str, object] = {}
    if metadata is not None:
        body[METADATA_KEY] = dict(metadata)
    infos = []
    position = 0
    for name, dtype, shape in tensors:
        size = math.prod(shape) * DTYPE_BYTES[dtype]
        infos.append(TensorInfo(name=name, dtype=dtype, shape=tuple(shape), start=position, end=position + size))
        body[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + size]}
        position += size
    raw = json.dumps(body, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, infos
