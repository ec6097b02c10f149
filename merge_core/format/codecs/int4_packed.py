"""Symmetric int4 with one scale per group of columns, packed eight to an int32, as compressed-tensors'
pack-quantized format stores it (Kimi K2-Thinking/K2.5 experts): W ≈ code × scale, code in [-8, 7].

Stored (quant_method "compressed-tensors", format pack-quantized): `X.weight_packed` I32 (out, in/8),
`X.weight_scale` (out, in/group), `X.weight_shape` [out, in].

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

from typing import Iterator, Mapping, Sequence

from merge_core.errors import InputError
from merge_core.format.codecs.checks import CORRUPT_FIX, UNQUANTIZED_FIX, module_names, positive_int, refusal
from merge_core.format.codecs.deferred import tensors, torch
from merge_core.format.header import TensorInfo
from merge_core.format.quantization import Codec, QuantizedWeight, QuantScheme

BITS = 4
OFFSET = 8
CODE_MIN, CODE_MAX = -8, 7
HALF_RANGE = 7.5  # (CODE_MAX - CODE_MIN) / 2, compressed-tensors' symmetric divisor
PER_WORD = 8
ZERO_GROUP_SCALE = 2.0 ** -23  # float32's eps


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


def group_steps(scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """One step of the codes is the group's scale, spread over its columns."""
    rows, groups = scale.shape
    return scale.float().repeat_interleave(group_size, dim=1).view(rows, groups * group_size)


# ---------------------------------------------------------------- config.json and the headers

SCALE_DTYPES = ("BF16", "F16", "F32")
ROLES = (("packed", ".weight_packed"), ("scale", ".weight_scale"), ("shape", ".weight_shape"))


def _group_size(group: object, qc: Mapping, subject: str) -> int | None:
    """The group size of one config group, None for a group that quantizes no weights (activations only)."""
    weights = group.get("weights") if isinstance(group, dict) else None
    if weights is None:
        return None
    fmt = group.get("format") or qc.get("format")
    if fmt != "pack-quantized":
        raise InputError(f"{subject}.format", f"compressed-tensors format {fmt!r} is not supported (supported: "
                         "pack-quantized, symmetric int4)", UNQUANTIZED_FIX)
    for field, wanted in (("num_bits", BITS), ("type", "int"), ("symmetric", True), ("strategy", "group")):
        if weights.get(field) != wanted:
            raise InputError(f"{subject}.weights.{field}", f"{weights.get(field)!r} is not supported (supported: "
                             "symmetric 4-bit int, group strategy)", UNQUANTIZED_FIX)
    if weights.get("actorder") == "group":  # stores a weight_g_idx permutation we would have to apply
        raise InputError(f"{subject}.weights.actorder", "'group' activation ordering is not supported",
                         UNQUANTIZED_FIX)
    size = weights.get("group_size")
    if not (positive_int(size) and size % PER_WORD == 0):
        raise InputError(f"{subject}.weights.group_size", f"{size!r} is not a positive multiple of {PER_WORD}",
                         "write the group size the scales were made with, e.g. 32")
    return size


def _weight(group: int, parts: dict[str, TensorInfo], where: str) -> QuantizedWeight:
    packed, scale, shape = parts["packed"], parts["scale"], parts["shape"]
    if packed.dtype != "I32" or len(packed.shape) != 2:
        raise refusal(where, packed.name, f"is {packed.dtype}{list(packed.shape)}; packed int4 is I32 (out, in/8)")
    if scale.dtype not in SCALE_DTYPES or len(scale.shape) != 2:
        raise refusal(where, scale.name, f"is {scale.dtype}{list(scale.shape)}; group scales are 2-D "
                      f"{', '.join(SCALE_DTYPES)}")
    if shape.dtype not in ("I32", "I64") or shape.shape != (2,):
        raise refusal(where, shape.name, f"is {shape.dtype}{list(shape.shape)}; weight_shape is I32 [out, in]")
    rows, cols = packed.shape[0], packed.shape[1] * PER_WORD
    if scale.shape != (rows, cols // group):
        fits = scale.shape[0] == rows and scale.shape[1] > 0 and cols % scale.shape[1] == 0
        fix = (f"the scales were made with group_size {cols // scale.shape[1]}: set it in config.json's "
               "quantization_config" if fits else CORRUPT_FIX)
        raise refusal(where, scale.name, f"has shape {list(scale.shape)} but group_size {group} and {packed.name} "
                      f"{list(packed.shape)} (in = {cols}) make {[rows, cols // group]}", fix)
    return QuantizedWeight(packed.name[: -len("_packed")], CODEC.name,
                           (("packed", packed), ("scale", scale), ("shape", shape)), (rows, cols), group_size=group)


def check_packed_shape(weight: QuantizedWeight, values: Sequence[int], where: str) -> None:
    """The `weight_shape` tensor's stored values must be the shape its packed codes and scales make."""
    if tuple(int(v) for v in values) != weight.shape:
        raise InputError(f"{where}: tensor {weight.part('shape').name}", f"holds {[int(v) for v in values]} but "
                         f"{weight.part('packed').name} and its scales make {list(weight.shape)}", CORRUPT_FIX)


# ---------------------------------------------------------------- the codec


class Int4Packed(Codec):
    name = "int4_packed"
    quant_method = "compressed-tensors"
    scale_role = "scale"
    described_by = ("shape",)

    def read_scheme(self, qc: Mapping, subject: str) -> QuantScheme:
        status = qc.get("quantization_status", "compressed")
        if status != "compressed":
            raise InputError(f"{subject}.quantization_status", f"{status!r}: only compressed checkpoints "
                             "(weight_packed) are supported", UNQUANTIZED_FIX)
        sparsity = qc.get("sparsity_config") or {}
        if sparsity.get("format", "dense") != "dense":
            raise InputError(f"{subject}.sparsity_config.format", f"sparse format {sparsity.get('format')!r} is "
                             "not supported", UNQUANTIZED_FIX)
        groups = qc.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise InputError(f"{subject}.config_groups", "is missing or empty", "fix config.json")
        sizes = {_group_size(group, qc, f"{subject}.config_groups.{key}") for key, group in groups.items()} - {None}
        if len(sizes) != 1:
            what = "no group quantizes weights" if not sizes else f"groups use different group sizes {sorted(sizes)}"
            raise InputError(f"{subject}.config_groups", what, UNQUANTIZED_FIX)
        return QuantScheme(self.quant_method, group_size=sizes.pop(),
                           not_converted=module_names(qc, ("ignore",), subject))

    def group(self, scheme: QuantScheme, infos: Mapping[str, TensorInfo], where: str) -> Iterator[QuantizedWeight]:
        modules = {name[: -len(suffix)] for name in infos for _, suffix in ROLES if name.endswith(suffix)}
        for module in sorted(modules):
            parts = {role: infos.get(module + suffix) for role, suffix in ROLES}
            missing = [module + suffix for role, suffix in ROLES if parts[role] is None]
            if missing:
                present = next(info.name for info in parts.values() if info is not None)
                raise refusal(where, present, f"has no {' or '.join(missing)} beside it (pack-quantized weights are "
                              "stored as weight_packed, weight_scale and weight_shape)")
            if module + ".weight_zero_point" in infos:
                raise refusal(where, module + ".weight_zero_point", "asymmetric int4 is not supported",
                              UNQUANTIZED_FIX)
            yield _weight(scheme.group_size, parts, where)

    def describe(self, scheme: QuantScheme) -> str:
        return f"int4 pack-quantized, groups of {scheme.group_size}"

    def check_stored(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor],
                     where: Mapping[str, str]) -> None:
        check_packed_shape(weight, parts["shape"].tolist(), where["shape"])

    def decode(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return dequantize(parts["packed"], parts["scale"], weight.group_size)

    def encode(self, weight: QuantizedWeight, merged: torch.Tensor,
               scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if scale is None:
            packed, scale = quantize(merged, weight.group_size, tensors.TORCH_DTYPES[weight.part("scale").dtype])
        else:
            packed = quantize_codes(merged, scale, weight.group_size)
        shape = torch.tensor(weight.shape, dtype=tensors.TORCH_DTYPES[weight.part("shape").dtype], device=merged.device)
        return {"packed": packed, "scale": scale, "shape": shape}

    def step(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return group_steps(parts["scale"], weight.group_size)


CODEC = Int4Packed()
