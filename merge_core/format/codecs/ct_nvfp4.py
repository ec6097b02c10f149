"""compressed-tensors' `nvfp4-pack-quantized` (NVFP4A16, NVFP4; RedHatAI's -NVFP4 releases):
`X.weight_packed` U8 (two e2m1 codes a byte, the low nibble first), `X.weight_scale` float8_e4m3fn per 16
values of a row, `X.weight_global_scale` F32 [1], a divisor: W ≈ code · (scale / global scale). With
NVFP4's activations, `X.input_global_scale` rides along unchanged.

Fresh scales as calculate_qparams makes them with a global scale: g = 448 · 6 / amax of the whole weight
(generate_gparam), each group's scale g · amax_group / 6 rounded to e4m3 (0 becomes 0.125); codes the
nearest e2m1 of x / (scale / g), ties to even. Fused siblings share one g (llm-compressor gives q/k/v,
gate/up and an expert's w1/w3 the smallest of theirs), which merge_core.worker keeps shared.

Decompressed as compressed-tensors does in float32, code · (scale / g), the quotient rounded once.
"""

from __future__ import annotations

from typing import Mapping

from merge_core.format.codecs import ct_packing
from merge_core.format.codecs.checks import refusal
from merge_core.format.codecs.ct_codec import CtCodec, refuse_args
from merge_core.format.codecs.deferred import torch
from merge_core.format.codecs.floats import as_float32
from merge_core.format.header import TensorInfo
from merge_core.format.quantization import QuantArgs, QuantizedWeight

NV_GROUP = 16


def fp4_logical(codes: TensorInfo, where: str, name: str) -> tuple[tuple[int, int], str]:
    """Two e2m1 codes a byte: (rows, 2 · bytes), decompressed to bf16."""
    if codes.dtype != "U8":
        raise refusal(where, codes.name, f"is {codes.dtype}; {name} codes are U8, two e2m1 codes a byte")
    return (codes.shape[0], 2 * codes.shape[1]), "BF16"


class CtNvfp4(CtCodec):
    name = "ct_nvfp4"
    formats = ("nvfp4-pack-quantized",)
    codes_suffix = "_packed"

    def check_args(self, args: QuantArgs, subject: str) -> None:
        for field, value, wanted in (("type", args.type, "float"), ("num_bits", args.num_bits, 4),
                                     ("strategy", args.strategy, "tensor_group"), ("group_size", args.group_size,
                                                                                   NV_GROUP),
                                     ("symmetric", args.symmetric, True)):
            if value != wanted:
                raise refuse_args(subject, field, value, "nvfp4-pack-quantized weights are symmetric float4 "
                                  f"(e2m1) in groups of {NV_GROUP} under one global scale (tensor_group)")
        if args.scale_dtype not in (None, "float8_e4m3fn"):
            raise refuse_args(subject, "scale_dtype", args.scale_dtype, "NVFP4 scales are float8_e4m3fn")

    def logical(self, codes: TensorInfo, args: QuantArgs, parts: Mapping[str, TensorInfo], where: str
                ) -> tuple[tuple[int, int], str]:
        return fp4_logical(codes, where, "nvfp4-pack-quantized")

    def scale_dtypes(self, args: QuantArgs) -> tuple[str, ...]:
        return ("F8_E4M3",)

    def read_codes(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return ct_packing.unpack_e2m1(parts["codes"])

    def write_codes(self, weight: QuantizedWeight, codes: torch.Tensor) -> torch.Tensor:
        return ct_packing.pack_e2m1(codes)

    def read_scale(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return as_float32(parts["scale"]) / parts["global_scale"].float()

    def write_scale(self, weight: QuantizedWeight, scale: torch.Tensor) -> torch.Tensor:
        return scale.to(torch.float8_e4m3fn)


CODEC = CtNvfp4()
