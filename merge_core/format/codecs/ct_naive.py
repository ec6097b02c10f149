"""compressed-tensors' unpacked formats: `int-quantized` (W8A8: int8 per channel), `float-quantized`
(FP8 e4m3 per tensor, per channel, per group or in blocks: FP8, FP8_DYNAMIC, FP8_BLOCK) and
`naive-quantized` (either, without activations): one compressor in the library
(NaiveQuantizationCompressor), which stores `X.weight` as int8 or float8_e4m3fn codes beside
`X.weight_scale` in the model's dtype, and an int8 `X.weight_zero_point` when asymmetric. A block
strategy's partial edge blocks are quantized as if padded with zeros.

Decompressed as (code − zero point) · scale in the scale's dtype: the float32 product here is exact
(8-bit codes, 8-bit bf16 significands), and rounds to what the library gives.
"""

from __future__ import annotations

from typing import Mapping

from merge_core.format.codecs.ct_codec import FLOAT_SCALES, CtCodec, refuse_args
from merge_core.format.codecs.checks import refusal
from merge_core.format.header import TensorInfo
from merge_core.format.quantization import QuantArgs

CODE_DTYPES = {"int": "I8", "float": "F8_E4M3"}


class CtNaive(CtCodec):
    name = "ct_naive"
    formats = ("int-quantized", "float-quantized", "naive-quantized")

    def check_args(self, args: QuantArgs, subject: str) -> None:
        if args.strategy not in ("tensor", "channel", "group", "block"):
            raise refuse_args(subject, "strategy", args.strategy, "int/float-quantized weights take tensor, "
                              "channel, group or block scales")
        if args.type == "int" and not 2 <= args.num_bits <= 8:
            raise refuse_args(subject, "num_bits", args.num_bits, "int-quantized weights are stored as int8: "
                              "2 to 8 bits")
        if args.type == "float" and args.num_bits != 8:
            raise refuse_args(subject, "num_bits", args.num_bits, "float-quantized weights are float8_e4m3fn: 8 bits")
        if args.type == "float" and not args.symmetric:
            raise refuse_args(subject, "symmetric", args.symmetric, "float weights are symmetric")
        if args.scale_dtype not in (None, "bfloat16", "float16", "float32"):
            raise refuse_args(subject, "scale_dtype", args.scale_dtype, "these formats store float scales "
                              "(E8M0 scales are mxfp8-quantized)")

    def logical(self, codes: TensorInfo, args: QuantArgs, parts: Mapping[str, TensorInfo], where: str
                ) -> tuple[tuple[int, int], str]:
        wanted = CODE_DTYPES[args.type]
        if codes.dtype != wanted:
            raise refusal(where, codes.name, f"is {codes.dtype}, but its config group's {args.type}{args.num_bits} "
                          f"weights are stored as {wanted}")
        scale = parts["scale"]
        return tuple(codes.shape), scale.dtype if scale is not None and scale.dtype in FLOAT_SCALES else "BF16"


CODEC = CtNaive()
