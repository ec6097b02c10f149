"""Symmetric int4 with one scale per group of columns, packed eight to an int32, as compressed-tensors'
pack-quantized format stores it (Kimi K2-Thinking/K2.5 experts): W ≈ code × scale, code in [-8, 7].

Packing as `pack_to_int32` (compressed_tensors/compressors/pack_quantized/helpers.py): code + 8, element j
of each run of eight in bits 4j..4j+3 of its word. Quantization as the package computes it on a float32
weight (quantization/utils/helpers.py `calculate_qparams`, quantization/lifecycle/forward_helpers.py
`_quantize`): amax = max(|min(x, 0)|, max(x, 0)) = max|x| per group, scale = amax / 7.5 in float32 (an
all-zero group gets float32's eps, 2^-23, to avoid dividing by zero), rounded to the stored scale dtype
when stored; codes = round-half-even(clamp(x / stored scale, -8, 7)), the division in float32.

Dequantization is exact in float32 (a 4-bit code times an 8-bit bf16 significand); the package computes
it in the scale dtype, which is this value rounded to bf16.

The quantizer cannot give back a dequantized weight's scales: amax / 7.5 maps the largest value to ±7.5,
stored as -8 or 7, so requantizing multiplies the scale by 16/15 or 14/15. `quantize_codes` keeps the
base's scales instead.
"""

from __future__ import annotations

import torch

BITS = 4
OFFSET = 8
CODE_MIN, CODE_MAX = -8, 7
HALF_RANGE = 7.5  # (CODE_MAX - CODE_MIN) / 2, compressed-tensors' symmetric divisor
PER_WORD = 8
ZERO_GROUP_SCALE = torch.finfo(torch.float32).eps


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 (out, in/8) -> int8 codes (out, in)."""
    shifts = torch.arange(0, 32, BITS, dtype=torch.int32, device=packed.device)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF
    return (nibbles.flatten(-2) - OFFSET).to(torch.int8)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes (out, in) -> int32 (out, in/8); shifts wrap into the sign bit as pack_to_int32's do."""
    nibbles = (codes.to(torch.int32) + OFFSET).view(*codes.shape[:-1], -1, PER_WORD)
    packed = nibbles[..., 0].clone()
    for j in range(1, PER_WORD):
        packed |= nibbles[..., j] << (BITS * j)
    return packed


def dequantize(packed: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 (out, in) = code × scale, exact."""
    rows, groups = scale.shape
    codes = unpack(packed).view(rows, groups, group_size)
    return (codes.float() * scale.float().unsqueeze(-1)).view(rows, groups * group_size)


def quantize(weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed int32 (out, in/8), scale (out, in/group) in scale_dtype) for a float32 weight (out, in)."""
    rows, columns = weight.shape
    amax = weight.float().view(rows, columns // group_size, group_size).abs().amax(dim=-1)
    scale = amax / HALF_RANGE
    scale = torch.where(scale == 0, torch.tensor(ZERO_GROUP_SCALE, device=scale.device), scale).to(scale_dtype)
    return quantize_codes(weight, scale, group_size), scale


def quantize_codes(weight: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """The packed codes of a float32 weight against given (stored) group scales."""
    rows, groups = scale.shape
    grouped = weight.float().view(rows, groups, group_size) / scale.float().unsqueeze(-1)
    codes = grouped.clamp_(CODE_MIN, CODE_MAX).round_().to(torch.int8)
    return pack(codes.view(rows, groups * group_size))
