"""compressed-tensors' `pack-quantized` (W4A16, W4A16_ASYM, W8A16, ...; Kimi K2-Thinking/K2.5's experts):
integer codes of 1 to 8 bits packed end to end into `X.weight_packed` I32 (merge_core.format.codecs.
ct_packing), `X.weight_scale` in the model's dtype per tensor, channel or group, `X.weight_shape` [out, in]
(I64, or I32 as Kimi stores it), and when asymmetric `X.weight_zero_point`, packed down the rows into I32
(per channel or group), or I8 per tensor. A `X.weight_g_idx` I32 [in] (GPTQ's activation ordering, as
older compressed-tensors stored it) names each column's group; it is kept as it is.

Fresh scales as calculate_qparams makes them: symmetric amax / ((qmax − qmin) / 2), e.g. amax / 7.5 for
4 bits (so requantizing a dequantized weight moves its scales by 16/15 or 14/15: --scales keep does not);
asymmetric (max − min) / (2^b − 1) with zero point round(clamp(qmin − min / scale)). Decompressed exactly
in float32: ((code − zero point) · a bf16 scale needs at most 17 bits).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from merge_core.errors import InputError
from merge_core.format.codecs import ct_math, ct_packing
from merge_core.format.codecs.checks import CORRUPT_FIX, refusal
from merge_core.format.codecs.ct_codec import FLOAT_SCALES, CtCodec, refuse_args
from merge_core.format.codecs.deferred import torch
from merge_core.format.header import TensorInfo
from merge_core.format.quantization import QuantArgs, QuantizedWeight

PACKED_ZERO_POINTS = ("group", "channel")  # PACK_ZP_STRATS: per tensor, the zero point stays int8


class CtPacked(CtCodec):
    name = "ct_packed"
    formats = ("pack-quantized",)
    codes_suffix = "_packed"
    optional_roles = ("g_idx",)  # only GPTQ's activation ordering stores one

    def check_args(self, args: QuantArgs, subject: str) -> None:
        if args.type != "int":
            raise refuse_args(subject, "type", args.type, "pack-quantized weights are integers")
        if not 1 <= args.num_bits <= 8:
            raise refuse_args(subject, "num_bits", args.num_bits, "pack-quantized packs 1 to 8 bits into int32")
        if args.strategy not in ("tensor", "channel", "group"):
            raise refuse_args(subject, "strategy", args.strategy, "pack-quantized weights take tensor, channel or "
                              "group scales")

    def logical(self, codes: TensorInfo, args: QuantArgs, parts: Mapping[str, TensorInfo], where: str
                ) -> tuple[tuple[int, int], str]:
        if codes.dtype != "I32":
            raise refusal(where, codes.name, f"is {codes.dtype}{list(codes.shape)}; packed codes are I32 "
                          f"({args.num_bits} bits each, end to end)")
        rows, words = codes.shape
        scale = parts["scale"]
        if args.strategy == "group" and scale is not None and len(scale.shape) == 2:
            columns = scale.shape[1] * args.group_size  # the library's groups divide the columns exactly
        else:
            columns = words * 32 // args.num_bits  # the widest the words hold: checked against weight_shape
        if ct_packing.packed_columns(columns, args.num_bits) != words:
            raise refusal(where, codes.name, f"has {words} words a row, but {columns} columns of {args.num_bits} "
                          f"bits (its scales, group_size {args.group_size}) pack into "
                          f"{ct_packing.packed_columns(columns, args.num_bits)}")
        return (rows, columns), scale.dtype if scale is not None and scale.dtype in FLOAT_SCALES else "BF16"

    def wanted(self, args: QuantArgs, rows: int, columns: int) -> dict:
        wanted = super().wanted(args, rows, columns)
        grid = ct_math.Grid(args, rows, columns)
        if not args.symmetric and args.strategy in PACKED_ZERO_POINTS:
            wanted["zero_point"] = (("I32",), (ct_packing.packed_columns(rows, args.num_bits), grid.shape[1]))
        wanted["shape"] = (("I32", "I64"), (2,))
        wanted["g_idx"] = (("I32",), (columns,)) if args.strategy == "group" else None
        return wanted

    def check_stored(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor],
                     where: Mapping[str, str]) -> None:
        check_packed_shape(weight, parts["shape"].tolist(), where["shape"])
        if "g_idx" in parts:
            groups = ct_math.Grid(weight.args, *weight.shape).shape[1]
            g_idx = parts["g_idx"]
            if bool(((g_idx < 0) | (g_idx >= groups)).any()):
                raise InputError(f"{where['g_idx']}: tensor {weight.part('g_idx').name}", f"names groups outside "
                                 f"0..{groups - 1}", CORRUPT_FIX)

    def read_codes(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return ct_packing.unpack_int32(parts["codes"], weight.args.num_bits, weight.shape[1]).float()

    def write_codes(self, weight: QuantizedWeight, codes: torch.Tensor) -> torch.Tensor:
        return ct_packing.pack_int32(codes.to(torch.int8), weight.args.num_bits)

    def read_zero(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        zero = parts.get("zero_point")
        if zero is None or zero.dtype != torch.int32:
            return None if zero is None else zero.float()
        return ct_packing.unpack_rows_int32(zero, weight.args.num_bits, weight.shape[0]).float()

    def write_zero(self, weight: QuantizedWeight, zero: torch.Tensor) -> torch.Tensor:
        if weight.part("zero_point").dtype != "I32":
            return zero.to(torch.int8)
        return ct_packing.pack_rows_int32(zero.to(torch.int8), weight.args.num_bits)


def check_packed_shape(weight: QuantizedWeight, values: Sequence[int], where: str) -> None:
    """The `weight_shape` tensor's stored values must be the shape its packed codes and scales make."""
    if tuple(int(v) for v in values) != weight.shape:
        raise InputError(f"{where}: tensor {weight.part('shape').name}", f"holds {[int(v) for v in values]} but "
                         f"{weight.part('codes').name} and its scales make {list(weight.shape)}", CORRUPT_FIX)


CODEC = CtPacked()
