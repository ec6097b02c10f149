"""The fuse math: W' = W + Σ scale·(B @ A), in float32, rounded once to W's dtype.

This is the arithmetic PEFT's merge_and_unload performs on a CPU: the adapter weights are
float32 (PEFT upcasts them on load), the delta is `(B @ A) * scale` in float32, and the
in-place `W += delta` adds in float32 and rounds once to W's dtype. Keeping the same order of
operations (matmul, then scale, then add) is what makes the result bit-identical.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
if hasattr(torch, "float8_e8m0fnu"):
    TORCH_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu


def tensor_from_bytes(data: bytes | bytearray | memoryview, dtype: str, shape: Sequence[int]) -> torch.Tensor:
    """A tensor over `data` (safetensors is little-endian, as is every platform we run on)."""
    if len(data) == 0:
        return torch.empty(tuple(shape), dtype=TORCH_DTYPES[dtype])
    with warnings.catch_warnings():
        # Read-only buffers are fine: the fuse never writes into its inputs.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(data, dtype=TORCH_DTYPES[dtype])
    return flat.reshape(tuple(shape))


def tensor_to_bytes(tensor: torch.Tensor) -> memoryview:
    tensor = tensor.contiguous().cpu().reshape(-1)
    return memoryview(tensor.view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")


@contextmanager
def exact_float32_matmul() -> Iterator[None]:
    """TF32 would round matmul inputs to 10 mantissa bits on CUDA; the merge must not."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous[0]
        torch.set_float32_matmul_precision(previous[1])


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float, transpose: bool = False) -> torch.Tensor:
    """ΔW = (B @ A)[ᵀ] · scale: the same operations, in the same order, as PEFT. The transpose is
    for fan_in_fan_out layers (GPT-2's Conv1D), whose weights are stored in×out."""
    product = b @ a
    return (product.T if transpose else product).mul_(scale)


@dataclass(frozen=True)
class FuseStats:
    """What one fuse did to one tensor, for the report: ‖ΔW‖, max |ΔW|, ‖W‖ (float32 ΔW, before rounding)."""
    delta_norm: float
    delta_max: float
    weight_norm: float
    nonfinite_introduced: int  # NaN/Inf elements in W' beyond those already in W


Factor = tuple[torch.Tensor | None, torch.Tensor, float, bool]  # A (None for a bias), B, scale, transpose


def fuse(weight: torch.Tensor, deltas: Sequence[Factor]) -> tuple[torch.Tensor, FuseStats]:
    """W' = W + Σ (B @ A)[ᵀ]·scale, accumulated in float32 and rounded once to W's dtype.

    A float64 base keeps float64 throughout, as PEFT casts the adapter to the base's dtype.
    ΔW + W is computed in place in ΔW's buffer (IEEE addition commutes, so the bits are those of
    PEFT's W += ΔW): the working set is W, W in float32, ΔW and the result.
    """
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    with exact_float32_matmul():
        base = weight.to(compute)
        delta = None
        for a, b, scale, transpose in deltas:
            b = b.to(base.device, compute)
            # A bias update (lora_bias) is lora_B's bias times the scale, as PEFT adds it.
            term = b.mul(scale) if a is None else lora_delta(a.to(base.device, compute), b, scale, transpose)
            delta = term if delta is None else delta.add_(term)
        stats = (delta.norm().item(), delta.abs().max().item() if delta.numel() else 0.0, base.norm().item())
        merged = delta.add_(base).to(weight.dtype)
    introduced = 0
    if not bool(merged.isfinite().all()):
        introduced = int((~merged.isfinite()).sum()) - int((~weight.isfinite()).sum())
    return merged, FuseStats(*stats, max(introduced, 0))


def resolve_device(requested: str, gpu_assigned: bool) -> str:
    """The torch device for a worker: CUDA when it was given a GPU it can see, else the CPU."""
    if requested == "cpu" or not gpu_assigned:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        raise RuntimeError("this worker was given a GPU but torch here cannot use CUDA; "
                           "install a CUDA build of torch on the workers or use --device cpu")
    return "cpu"  # auto on a node whose GPU torch cannot drive (e.g. a logical GPU)
