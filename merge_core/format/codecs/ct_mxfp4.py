"""compressed-tensors' `mxfp4-pack-quantized` (MXFP4A16; Kimi K3's routed experts): `X.weight_packed` U8
(two e2m1 codes a byte, the low nibble first), `X.weight_scale` U8, one E8M0 byte (2^(e − 127)) per 32
values of a row.

Not GPT-OSS's layout (merge_core.format.codecs.mxfp4: 3-D `_blocks`/`_scales`, triton's scale rounding):
here fresh scales are generate_mx_scales', the group's largest magnitude rounded to a power of two (up
from a mantissa of 0.75), its exponent less 2 (e2m1's largest value is 1.5 · 2^2), so the largest value
of a group may saturate at 6; codes the nearest e2m1, ties to even. Decompressed exactly.
"""

from __future__ import annotations

from typing import Mapping

from merge_core.format.codecs import ct_packing
from merge_core.format.codecs.ct_codec import CtCodec
from merge_core.format.codecs.ct_mxfp8 import MxScales, check_mx
from merge_core.format.codecs.ct_nvfp4 import fp4_logical
from merge_core.format.codecs.deferred import torch
from merge_core.format.header import TensorInfo
from merge_core.format.quantization import QuantArgs, QuantizedWeight


class CtMxfp4(MxScales, CtCodec):
    name = "ct_mxfp4"
    formats = ("mxfp4-pack-quantized",)
    codes_suffix = "_packed"

    def check_args(self, args: QuantArgs, subject: str) -> None:
        check_mx(args, subject, 4, "mxfp4-pack-quantized")

    def logical(self, codes: TensorInfo, args: QuantArgs, parts: Mapping[str, TensorInfo], where: str
                ) -> tuple[tuple[int, int], str]:
        return fp4_logical(codes, where, "mxfp4-pack-quantized")

    def read_codes(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return ct_packing.unpack_e2m1(parts["codes"])

    def write_codes(self, weight: QuantizedWeight, codes: torch.Tensor) -> torch.Tensor:
        return ct_packing.pack_e2m1(codes)


CODEC = CtMxfp4()
