"""compressed-tensors' `mxfp8-quantized` (MXFP8A16): `X.weight` float8_e4m3fn codes, one E8M0
`X.weight_scale` byte (2^(e − 127)) per 32 values of a row.

Fresh scales as generate_mx_scales makes them: the group's largest magnitude rounded to a power of two
(up from a mantissa of 0.75), its exponent less 8 (e4m3's largest value is 1.75 · 2^8). Decompressed
exactly: an e4m3 code times a power of two.
"""

from __future__ import annotations

from typing import Mapping

from merge_core.format.codecs import ct_math
from merge_core.format.codecs.checks import refusal
from merge_core.format.codecs.ct_codec import CtCodec, refuse_args
from merge_core.format.codecs.deferred import torch
from merge_core.format.header import TensorInfo
from merge_core.format.quantization import QuantArgs, QuantizedWeight

MX_GROUP = 32


def check_mx(args: QuantArgs, subject: str, bits: int, name: str) -> None:
    """An MX format's weights: float, `bits` bits, symmetric, groups of 32, uint8 (E8M0) scales."""
    for field, value, wanted in (("type", args.type, "float"), ("num_bits", args.num_bits, bits),
                                 ("strategy", args.strategy, "group"), ("group_size", args.group_size, MX_GROUP),
                                 ("symmetric", args.symmetric, True), ("scale_dtype", args.scale_dtype, "uint8")):
        if value != wanted:
            raise refuse_args(subject, field, value, f"{name} weights are symmetric float{bits} in groups of "
                              f"{MX_GROUP} with uint8 (E8M0) scales")


class MxScales:
    """E8M0 scale bytes, read as 2^(e − 127) and written back from calculate_qparams' powers of two."""

    def read_scale(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return ct_math.mx_scale(parts["scale"])

    def write_scale(self, weight: QuantizedWeight, scale: torch.Tensor) -> torch.Tensor:
        return (ct_math.E8M0_BIAS + torch.floor(torch.log2(scale))).to(torch.uint8)  # compress_mx_scale

    def scale_dtypes(self, args: QuantArgs) -> tuple[str, ...]:
        return ("U8",)


class CtMxfp8(MxScales, CtCodec):
    name = "ct_mxfp8"
    formats = ("mxfp8-quantized",)

    def check_args(self, args: QuantArgs, subject: str) -> None:
        check_mx(args, subject, 8, "mxfp8-quantized")

    def logical(self, codes: TensorInfo, args: QuantArgs, parts: Mapping[str, TensorInfo], where: str
                ) -> tuple[tuple[int, int], str]:
        if codes.dtype != "F8_E4M3":
            raise refusal(where, codes.name, f"is {codes.dtype}; mxfp8-quantized codes are F8_E4M3")
        return tuple(codes.shape), "BF16"


CODEC = CtMxfp8()
