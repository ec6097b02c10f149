"""Quantized weights to float32 and back, one entry point for every format in `merge_core.format.quantization`.

Pure tensor in, tensor out, on whatever device the tensors are: the worker reads the stored parts, decodes,
fuses in float32, encodes, and writes each part with exactly the dtype and shape the base stores.

decode gives the exact float32 value of code × scale (one rounding for FP8, none for MXFP4 and INT4). The
bf16 weight transformers dequantizes to, which PEFT would merge into, is that rounded to `weight.dtype`.

encode(weight, merged) requantizes with the reference quantizer of each format, fresh scales included.
encode(weight, merged, scales_from=base_parts) keeps the base's scales and computes only the codes: the
weight comes back bit for bit when unchanged, whatever made its scales (quantization-aware training, an
older quantizer), and scales do not drift on requantization (INT4's amax / 7.5 moves every scale by 16/15 or
14/15 otherwise); values past a block's range saturate.
"""

from __future__ import annotations

from typing import Mapping

import torch

from merge_core.format.codecs import fp8_block, int4_packed, mxfp4
from merge_core.format.quantization import QuantizedWeight
from merge_core.format.tensors import TORCH_DTYPES

MXFP4_TIES = "away"


def decode(weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The float32 logical weight, `weight.shape`, from its stored parts by role."""
    _check_parts(weight, parts, roles=[role for role, _ in weight.parts if role != "shape"])
    if weight.codec == "fp8_block":
        return fp8_block.dequantize(parts["codes"], parts["scale"], weight.block)
    if weight.codec == "mxfp4":
        return mxfp4.dequantize(parts["blocks"], parts["scales"])
    if weight.codec == "int4_packed":
        return int4_packed.dequantize(parts["packed"], parts["scale"], weight.group_size)
    raise ValueError(f"unknown codec {weight.codec!r}")


def encode(weight: QuantizedWeight, merged: torch.Tensor,
           scales_from: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The stored parts by role, each with the stored dtype and shape, for a float32 logical weight.
    With `scales_from` (the base's parts), its scales are kept and only the codes are recomputed."""
    if tuple(merged.shape) != weight.shape:
        raise ValueError(f"{weight.name}: merged shape {tuple(merged.shape)} is not {weight.shape}")
    scale_role = {"fp8_block": "scale", "mxfp4": "scales", "int4_packed": "scale"}[weight.codec]
    kept = None
    if scales_from is not None:
        _check_parts(weight, scales_from, roles=[scale_role])
        kept = scales_from[scale_role]
    if weight.codec == "fp8_block":
        scale_dtype = TORCH_DTYPES[weight.part("scale").dtype]
        if kept is None:
            codes, kept = fp8_block.quantize(merged, weight.block, scale_dtype, ue8m0=weight.scale_fmt == "ue8m0")
        else:
            codes = fp8_block.quantize_codes(merged, kept, weight.block)
        parts = {"codes": codes, "scale": kept}
    elif weight.codec == "mxfp4":
        # Ties away from zero, as the issue's reference (triton_kernels' downcast_to_mxfp_torch before
        # its 2025 change to ties-to-even, the rounding GPT-OSS was released with) specifies.
        if kept is None:
            blocks, kept = mxfp4.quantize(merged, ties=MXFP4_TIES)
        else:
            blocks = mxfp4.quantize_codes(merged, kept, ties=MXFP4_TIES)
        parts = {"blocks": blocks, "scales": kept}
    else:
        scale_dtype = TORCH_DTYPES[weight.part("scale").dtype]
        if kept is None:
            packed, kept = int4_packed.quantize(merged, weight.group_size, scale_dtype)
        else:
            packed = int4_packed.quantize_codes(merged, kept, weight.group_size)
        shape_dtype = TORCH_DTYPES[weight.part("shape").dtype]
        parts = {"packed": packed, "scale": kept,
                 "shape": torch.tensor(weight.shape, dtype=shape_dtype, device=merged.device)}
    _check_parts(weight, parts, roles=[role for role, _ in weight.parts])
    return parts


def _check_parts(weight: QuantizedWeight, parts: Mapping[str, torch.Tensor], roles: list[str]) -> None:
    """Each part has the stored dtype and shape: a mix-up here would write a corrupt checkpoint silently."""
    for role in roles:
        info = weight.part(role)
        tensor = parts.get(role)
        if tensor is None or tensor.dtype != TORCH_DTYPES[info.dtype] or tuple(tensor.shape) != info.shape:
            got = "missing" if tensor is None else f"{tensor.dtype}{list(tensor.shape)}"
            raise ValueError(f"{weight.name}: part {role} ({info.name}) is {got}, stored as {info.dtype}"
                             f"{list(info.shape)}")
