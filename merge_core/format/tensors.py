"""Tensors over raw safetensors bytes: dtype names to torch dtypes, views without copies."""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch

TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
if hasattr(torch, "float8_e8m0fnu"):
    TORCH_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def tensor_from_bytes(data: bytes | bytearray | memoryview, dtype: str, shape: Sequence[int]) -> torch.Tensor:
    """A tensor over `data` (safetensors is little-endian, as is every platform we run on)."""
    if len(data) == 0:
        return torch.empty(tuple(shape), dtype=TORCH_DTYPES[dtype])
    with warnings.catch_warnings():
        # Read-only buffers are fine: the fuse never writes into its inputs.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(data, dtype=TORCH_DTYPES[dtype])
    return flat.reshape(tuple(shape))


def resized(weight: torch.Tensor, shape: Sequence[int]) -> tuple[bytearray, torch.Tensor]:
    """A buffer of another first dimension (a resized vocabulary) holding W's leading rows, zeros
    past them. The adapter's copy replaces it whole; W's rows give the report a meaningful ΔW."""
    buffer = bytearray(math.prod(shape) * weight.element_size())
    grown = tensor_from_bytes(buffer, DTYPE_NAMES[weight.dtype], shape)
    rows = min(grown.shape[0], weight.shape[0])
    grown[:rows].copy_(weight[:rows])
    return buffer, grown
