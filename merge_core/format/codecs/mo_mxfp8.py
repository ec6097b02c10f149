"""ModelOpt's MXFP8 (quant_algo MXFP8): `X.weight` F8_E4M3 (out, in) beside `X.weight_scale` U8
(out, in/32), each byte an E8M0 exponent e with its scale 2^(e − 127), one per 32 values of a row, as vLLM's
ModelOptMxFp8LinearMethod loads them. W = code · 2^(e − 127), exact.

Fresh scales as ModelOpt computes them (modelopt/torch/quantization/qtensor/mxfp8_tensor.py,
MXFP8QTensor._compute_e8m0_exponent and quantize_with_scale), which is not compressed-tensors' MX rounding
(its exponent comes from the group's amax rounded to a power of two, less 8): e = ceil(log2(amax / 448)),
clamped to [−127, 127], −127 for an all-zero group; codes = e4m3(clamp(W′ · 2^(127 − e), ±448)), torch's
cast. The ceiling is taken exactly from the float32 quotient's exponent and mantissa (torch.frexp);
ModelOpt's torch.log2 agrees except within a few ulps above a power of two.
"""

from __future__ import annotations

from typing import Mapping

from merge_core.format.codecs import ct_math
from merge_core.format.codecs.ct_math import E4M3_MAX, E8M0_BIAS
from merge_core.format.codecs.deferred import torch
from merge_core.format.codecs.mo_codec import MoCodec
from merge_core.format.quantization import QuantArgs, QuantizedWeight

MX_GROUP = 32
ARGS = QuantArgs(8, "float", "group", group_size=MX_GROUP, scale_dtype="uint8")


class MoMxfp8(MoCodec):
    name = "modelopt_mxfp8"
    algos = {"MXFP8": ARGS}
    scale_dtype = "U8"

    def scale_shapes(self, args: QuantArgs, rows: int, columns: int) -> tuple[tuple[int, ...], ...]:
        return ((rows, columns // MX_GROUP),)

    def read_scale(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return ct_math.mx_scale(parts["scale"])

    def fresh_scales(self, weight: QuantizedWeight, merged: torch.Tensor, given: Mapping[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
        amax = merged.float().abs().unflatten(1, (-1, MX_GROUP)).amax(dim=-1)
        return {"scale": (e8m0_exponent(amax) + E8M0_BIAS).to(torch.uint8)}


def e8m0_exponent(amax: torch.Tensor) -> torch.Tensor:
    """ceil(log2(amax / 448)) in [−127, 127] (float), −127 where amax is 0: a quotient m · 2^k with m in
    [0.5, 1) has the ceiling k, or k − 1 when m is exactly 0.5."""
    mantissa, exponent = torch.frexp(amax.float() / E4M3_MAX)
    ceiling = torch.where(mantissa == 0.5, exponent - 1, exponent).float()
    return torch.where(amax > 0, ceiling, torch.full_like(ceiling, -E8M0_BIAS)).clamp(-E8M0_BIAS, E8M0_BIAS)


CODEC = MoMxfp8()
