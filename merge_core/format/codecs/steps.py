"""The quantization step at each element of a stored quantized weight: how far apart its value and the
next one its format can store are. The final task's spot check allows a merged quantized weight that much
from the exact merge: a correct requantization rounds each value to within half a step.
"""

from __future__ import annotations

from typing import Mapping

import torch

from merge_core.format.codecs import fp8_block, mxfp4
from merge_core.format.quantization import QuantizedWeight

_E4M3_MIN_EXPONENT = -6  # below 2^-6 e4m3 is subnormal, with the spacing of 2^-6's binade
_E4M3_MANTISSA_BITS = 3


def step(weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """float32, `weight.shape`: the spacing of the format's values around each stored element, scaled."""
    if weight.codec == "fp8_block":
        codes = parts["codes"].float().abs()
        exponent = torch.floor(torch.log2(codes.clamp(min=2.0 ** _E4M3_MIN_EXPONENT)))
        spacing = torch.exp2(exponent - _E4M3_MANTISSA_BITS).to(torch.float8_e4m3fn)  # powers of two: exact
        return fp8_block.dequantize(spacing, parts["scale"], weight.block)
    if weight.codec == "mxfp4":
        lut = torch.tensor(mxfp4.E2M1_VALUES, dtype=torch.float32, device=parts["blocks"].device)
        values = mxfp4.unpack(parts["blocks"], lut).abs()
        spacing = torch.where(values < 2, 0.5, torch.where(values < 4, 1.0, 2.0))  # e2m1: 0.5, 1, 2 apart
        return mxfp4.dequantize(mxfp4.pack(mxfp4.e2m1_codes(spacing)), parts["scales"])
    if weight.codec == "int4_packed":
        rows, groups = parts["scale"].shape
        return parts["scale"].float().repeat_interleave(weight.group_size, dim=1).view(rows, groups * weight.group_size)
    raise ValueError(f"unknown codec {weight.codec!r}")
