"""MXFP4 experts as GPT-OSS stores them: groups of 32 e2m1 values sharing one E8M0 scale 2^(s-127).

Stored (quant_method "mxfp4"): `X_blocks` U8 (E, R, G, 16), two codes a byte, low nibble first, beside
`X_scales` U8 (E, R, G), E8M0 exponents. The logical
weight is the bf16 model's parameter, (E, G*32, R): transformers' `convert_moe_packed_tensors`
(transformers/integrations/mxfp4.py) dequantizes to (E, R, G*32) and transposes the last two dimensions.

Requantization reproduces triton_kernels' torch reference `downcast_to_mxfp_torch`
(triton-lang/triton, python/triton_kernels/triton_kernels/numerics_details/mxfp.py) with its default
DequantScaleRoundingMode.ROUND_UP: scale = the group's amax / 6 in float32 with its mantissa rounded up
to a power of two (by bit arithmetic), so the largest value never clips; values are multiplied by 1/scale
and rounded to e2m1 by bit arithmetic, saturating at ±6. Ties round to even since triton PR #8110
(Sept. 2025), which made mxfp4 consistent with mxfp8 and the hardware's cvt.rn; before it (and when GPT-OSS
was released) ties went away from zero. `ties="away"` gives that older rounding.

Groups come back with the same values, though not always the same bits: the scale is recomputed from the
largest magnitude, so a group whose largest code is below 4 (3, 2, 1.5, ...) gets a smaller scale and
doubled codes. Groups with a largest code of ±4 or ±6, which this quantizer always produces, and all-zero
groups with scale byte 0, survive bit for bit.
"""

from __future__ import annotations

from typing import Iterator, Mapping

from merge_core.format.codecs.checks import module_names, refusal
from merge_core.format.codecs.deferred import torch
from merge_core.format.codecs.floats import round_up_to_power_of_two
from merge_core.format.header import TensorInfo
from merge_core.format.quantization import Codec, Method, QuantizedWeight, QuantScheme

GROUP = 32  # e2m1 values per E8M0 scale, fixed by the OCP MX format
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E2M1_MAX = 6.0
E8M0_BIAS = 127
# Ties away from zero, as the issue's reference (triton_kernels' downcast_to_mxfp_torch before its 2025
# change to ties-to-even, the rounding GPT-OSS was released with) specifies.
TIES = "away"


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 (E, G*32, R) from blocks (E, R, G, 16) and scales (E, R, G); exact (e2m1 × 2^k)."""
    experts, rows, groups, _ = blocks.shape
    weight = torch.empty(experts, groups * GROUP, rows, dtype=torch.float32, device=blocks.device)
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    for e in range(experts):  # one expert at a time bounds the index and value temporaries
        values = unpack(blocks[e], lut) * scale_values(scales[e]).unsqueeze(-1)
        weight[e] = values.view(rows, groups * GROUP).t()
    return weight


def unpack(blocks: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """(..., 16) bytes -> (..., 32) float32 e2m1 values, the low nibble of each byte first."""
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2)
    return lut[codes.long()]


def scale_values(scales: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes -> float32 2^(s-127), exactly as torch.ldexp gives them in transformers: a byte is a
    float32 exponent field, except 0 (2^-127 is subnormal in float32); 255 gives inf, as ldexp does."""
    powers = (scales.to(torch.int32) << 23).view(torch.float32)
    return torch.where(scales == 0, torch.tensor(2.0 ** -E8M0_BIAS, device=scales.device), powers)


def quantize(weight: torch.Tensor, ties: str = "even") -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks U8 (E, R, G, 16), scales U8 (E, R, G)) for a float32 logical weight (E, G*32, R)."""
    experts, columns, rows = weight.shape
    groups = columns // GROUP
    blocks = torch.empty(experts, rows, groups, GROUP // 2, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(experts, rows, groups, dtype=torch.uint8, device=weight.device)
    for e in range(experts):
        grouped = weight[e].t().float().reshape(rows, groups, GROUP)
        scale_bits = _scale_bits(grouped.abs().amax(dim=-1, keepdim=True))
        blocks[e] = pack(e2m1_codes(grouped * _reciprocal(scale_bits), ties))
        scales[e] = (scale_bits >> 23).squeeze(-1).to(torch.uint8)
    return blocks, scales


def quantize_codes(weight: torch.Tensor, scales: torch.Tensor, ties: str = "even") -> torch.Tensor:
    """The blocks of a float32 logical weight against given (stored) scales, saturating at ±6."""
    experts, columns, rows = weight.shape
    groups = columns // GROUP
    blocks = torch.empty(experts, rows, groups, GROUP // 2, dtype=torch.uint8, device=weight.device)
    for e in range(experts):
        grouped = weight[e].t().float().reshape(rows, groups, GROUP)
        blocks[e] = pack(e2m1_codes(grouped / scale_values(scales[e]).unsqueeze(-1), ties))
    return blocks


def _scale_bits(amax: torch.Tensor) -> torch.Tensor:
    """The float32 bits of amax / 6 rounded up to a power of two (0 stays 0): the ROUND_UP scale."""
    return round_up_to_power_of_two(amax / E2M1_MAX).view(torch.int32)


def _reciprocal(scale_bits: torch.Tensor) -> torch.Tensor:
    scale = scale_bits.view(torch.float32)
    return torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)


def e2m1_codes(values: torch.Tensor, ties: str = "even") -> torch.Tensor:
    """4-bit e2m1 codes (sign bit 3) of float32 values, nearest, saturating at ±6. Bit arithmetic as in
    downcast_to_mxfp_torch: widen e2m1's exponent from float32's, keep two mantissa bits, round on the
    guard bit (ties to even, or away from zero)."""
    bits = values.contiguous().view(torch.int32)
    sign = (bits < 0).to(torch.int32) << 3
    exponent = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    subnormal = exponent < 127  # below 1.0 e2m1 is subnormal (0 and 0.5): shift the implicit bit in
    shift = (126 - exponent).clamp(0, 31)
    widened = 0x400000 | (mantissa >> 1)
    dropped = subnormal & (((mantissa & 1) != 0) | ((widened & ((1 << shift) - 1)) != 0))
    mantissa = torch.where(subnormal, widened >> shift, mantissa)
    exponent = exponent.clamp(min=126) - 126
    kept = (mantissa >> 21) & 0x3  # e2m1's mantissa bit, then the guard bit
    if ties == "even":
        sticky = dropped | ((mantissa & 0x1FFFFF) != 0)
        round_up = (kept & 1) & (sticky.to(torch.int32) | (kept >> 1))
    elif ties == "away":
        round_up = torch.ones_like(kept)  # adding half an e2m1 step, then truncating
    else:
        raise ValueError(f"ties must be 'even' or 'away', not {ties!r}")
    magnitude = ((((exponent << 2) | kept) + round_up) >> 1).clamp(max=0x7)
    return (sign | magnitude).to(torch.uint8)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """(..., 32) 4-bit codes -> (..., 16) bytes, the even element in the low nibble."""
    pairs = codes.view(*codes.shape[:-1], GROUP // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def steps(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The spacing of e2m1 values around each code (0.5, 1 or 2), times its group's scale."""
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    values = unpack(blocks, lut).abs()
    spacing = torch.where(values < 2, 0.5, torch.where(values < 4, 1.0, 2.0))
    return dequantize(pack(e2m1_codes(spacing)), scales)


class Mxfp4(Method, Codec):
    name = "mxfp4"
    quant_method = "mxfp4"
    scale_roles = ("scales",)

    def read_scheme(self, qc: Mapping, subject: str) -> QuantScheme:
        return QuantScheme(self.quant_method, group_size=GROUP,
                           not_converted=module_names(qc, ("modules_to_not_convert",), subject))

    def group(self, scheme: QuantScheme, infos: Mapping[str, TensorInfo], where: str) -> Iterator[QuantizedWeight]:
        stems = {name[: -len(suffix)] for name in infos for suffix in ("_blocks", "_scales") if name.endswith(suffix)}
        for stem in sorted(stems):
            blocks, scales = infos.get(stem + "_blocks"), infos.get(stem + "_scales")
            if blocks is None or scales is None:
                present, missing = ((stem + "_blocks", stem + "_scales") if scales is None
                                    else (stem + "_scales", stem + "_blocks"))
                raise refusal(where, present, f"has no {missing} beside it")
            if blocks.dtype != "U8" or len(blocks.shape) != 4 or blocks.shape[-1] != GROUP // 2:
                raise refusal(where, blocks.name, f"is {blocks.dtype}{list(blocks.shape)}; MXFP4 blocks are U8 "
                              f"(experts, rows, groups, {GROUP // 2})")
            if scales.dtype != "U8" or scales.shape != blocks.shape[:-1]:
                raise refusal(where, scales.name, f"is {scales.dtype}{list(scales.shape)}; {blocks.name} needs U8 "
                              f"{list(blocks.shape[:-1])}, one E8M0 scale per {GROUP} values")
            experts, rows, groups, _ = blocks.shape
            yield QuantizedWeight(stem, self.name, (("blocks", blocks), ("scales", scales)),
                                  (experts, groups * GROUP, rows), group_size=GROUP)

    def describe(self, scheme: QuantScheme) -> str:
        return "mxfp4"

    def decode(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return dequantize(parts["blocks"], parts["scales"])

    def encode(self, weight: QuantizedWeight, merged: torch.Tensor,
               given: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        scale = given.get("scales")
        if scale is None:
            blocks, scale = quantize(merged, ties=TIES)
        else:
            blocks = quantize_codes(merged, scale, ties=TIES)
        return {"blocks": blocks, "scales": scale}

    def step(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return steps(parts["blocks"], parts["scales"])

    def reach(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        sixes = torch.full(parts["blocks"].shape, 0x77, dtype=torch.uint8, device=parts["blocks"].device)
        top = dequantize(sixes, parts["scales"])  # every code 6, the largest e2m1
        return -top, top


CODEC = Mxfp4()
