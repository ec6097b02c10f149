"""Quantized base checkpoints: which stored tensors make one logical weight, from config.json and the headers.

Three formats are kept exactly as the base stores them (the tensor math is in `codecs/`):
- "fp8" (DeepSeek-V3/R1, Kimi K2-Instruct, MiniMax-M2, Qwen3 -FP8): `X.weight` F8_E4M3 (out, in) beside
  `X.weight_scale_inv` F32/BF16 (ceil(out/bo), ceil(in/bi)), one scale per weight_block_size block.
- "mxfp4" (GPT-OSS experts): `X_blocks` U8 (E, R, K/32, 16), two e2m1 codes a byte, beside `X_scales`
  U8 (E, R, K/32), E8M0 exponents. The logical weight is the bf16 model's `X`, (E, K, R).
- "compressed-tensors" pack-quantized int4 (Kimi K2-Thinking/K2.5 experts): `X.weight_packed` I32
  (out, in/8), `X.weight_scale` (out, in/group), `X.weight_shape` [out, in].

Torch-free, so the driver can plan from headers alone. Which modules are quantized is decided by what is
stored, not by modules_to_not_convert/ignore: a weight stored plainly merges like any bf16 tensor, and those
lists (kept in the scheme for the record) follow each loader's own matching rules, which we need not copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

from merge_core.errors import InputError
from merge_core.format.header import TensorInfo

QUANT_METHODS = ("fp8", "mxfp4", "compressed-tensors")
CODECS = ("fp8_block", "mxfp4", "int4_packed")
PRIMARY_ROLES = {"fp8_block": "codes", "mxfp4": "blocks", "int4_packed": "packed"}
FP8_FORMATS = ("e4m3", "float8_e4m3fn")  # DeepSeek/Qwen write "e4m3", MiniMax "float8_e4m3fn"
SCALE_FORMATS = ("float", "ue8m0")
FP8_SCALE_DTYPES = ("F32", "BF16")
INT4_SCALE_DTYPES = ("BF16", "F16", "F32")
MXFP4_GROUP = 32  # e2m1 values per E8M0 scale, fixed by the OCP MX format
INT4_PER_WORD = 8
UNQUANTIZED_FIX = "merge with an unquantized (bf16) base"
CORRUPT_FIX = "the checkpoint is corrupt or was not written by a supported quantizer; re-download it"


@dataclass(frozen=True)
class QuantScheme:
    """config.json's quantization_config, checked. Fields of the other methods keep their defaults."""

    method: str  # one of QUANT_METHODS
    block: tuple[int, int] | None = None  # fp8 weight_block_size (rows, columns)
    scale_fmt: str = "float"  # fp8: "float", or "ue8m0" (every scale a power of two)
    group_size: int | None = None  # values per scale: int4's group_size, mxfp4's 32
    not_converted: tuple[str, ...] = ()  # modules_to_not_convert / ignored_layers / ignore, as written


@dataclass(frozen=True)
class QuantizedWeight:
    """One logical weight and the stored tensors it is made of."""

    name: str  # `X.weight` (fp8, int4) or the bf16 model's `...experts.gate_up_proj` (mxfp4)
    codec: str  # one of CODECS
    parts: tuple[tuple[str, TensorInfo], ...]  # role -> stored tensor, in the order the roles are listed
    shape: tuple[int, ...]  # as the model holds it in memory once dequantized
    dtype: str = "BF16"  # what transformers dequantizes to
    block: tuple[int, int] | None = None  # fp8
    scale_fmt: str = "float"  # fp8
    group_size: int | None = None  # int4, mxfp4

    def part(self, role: str) -> TensorInfo:
        for name, info in self.parts:
            if name == role:
                return info
        raise KeyError(role)

    @property
    def stored_names(self) -> tuple[str, ...]:
        return tuple(info.name for _, info in self.parts)

    @property
    def primary(self) -> TensorInfo:
        """The largest part (the codes): the output writes the weight where the base stores it."""
        return self.part(PRIMARY_ROLES[self.codec])


# ---------------------------------------------------------------- config.json


def read_scheme(config: Mapping, where: str) -> QuantScheme | None:
    """The base's quantization scheme from config.json, None when it has none. Multimodal configs
    (Kimi K2.5) keep it under text_config."""
    subject = f"{where}: quantization_config"
    qc = config.get("quantization_config")
    if qc is None and isinstance(config.get("text_config"), dict):
        qc = config["text_config"].get("quantization_config")
        subject = f"{where}: text_config.quantization_config"
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise InputError(subject, f"{qc!r} is not a JSON object", "fix config.json")
    method = qc.get("quant_method")
    if method not in QUANT_METHODS:
        raise InputError(f"{subject}.quant_method", f"quantization {method!r} is not supported "
                         f"(supported: {', '.join(QUANT_METHODS)})", UNQUANTIZED_FIX)
    if method == "fp8":
        return _fp8_scheme(qc, subject)
    if method == "mxfp4":
        return QuantScheme("mxfp4", group_size=MXFP4_GROUP,
                           not_converted=_names(qc, ("modules_to_not_convert",), subject))
    return _int4_scheme(qc, subject)


def _names(qc: Mapping, keys: Sequence[str], subject: str) -> tuple[str, ...]:
    for key in keys:
        value = qc.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InputError(f"{subject}.{key}", f"{value!r} is not a list of module names", "fix config.json")
        return tuple(value)
    return ()


def _fp8_scheme(qc: Mapping, subject: str) -> QuantScheme:
    fmt = qc.get("fmt", "e4m3")
    if fmt not in FP8_FORMATS:
        raise InputError(f"{subject}.fmt", f"FP8 format {fmt!r} is not supported (supported: "
                         f"{', '.join(FP8_FORMATS)})", UNQUANTIZED_FIX)
    scale_fmt = qc.get("scale_fmt") or "float"
    if scale_fmt not in SCALE_FORMATS:
        raise InputError(f"{subject}.scale_fmt", f"scale format {scale_fmt!r} is not supported (supported: "
                         f"{', '.join(SCALE_FORMATS)})", UNQUANTIZED_FIX)
    block = qc.get("weight_block_size")
    if block is None:
        raise InputError(f"{subject}.weight_block_size", "is missing: only block-scaled FP8 is supported, not "
                         "per-tensor scales", UNQUANTIZED_FIX)
    if not (isinstance(block, list) and len(block) == 2 and all(_positive_int(b) for b in block)):
        raise InputError(f"{subject}.weight_block_size", f"{block!r} is not two positive integers",
                         "write the block size the scales were made with, e.g. [128, 128]")
    not_converted = _names(qc, ("modules_to_not_convert", "ignored_layers"), subject)
    return QuantScheme("fp8", block=(block[0], block[1]), scale_fmt=scale_fmt, not_converted=not_converted)


def _int4_scheme(qc: Mapping, subject: str) -> QuantScheme:
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise InputError(f"{subject}.quantization_status", f"{status!r}: only compressed checkpoints "
                         "(weight_packed) are supported", UNQUANTIZED_FIX)
    sparsity = qc.get("sparsity_config") or {}
    if sparsity.get("format", "dense") != "dense":
        raise InputError(f"{subject}.sparsity_config.format", f"sparse format {sparsity.get('format')!r} is not "
                         "supported", UNQUANTIZED_FIX)
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise InputError(f"{subject}.config_groups", "is missing or empty", "fix config.json")
    sizes = {_int4_group(group, qc, f"{subject}.config_groups.{key}") for key, group in groups.items()} - {None}
    if len(sizes) != 1:
        what = "no group quantizes weights" if not sizes else f"groups use different group sizes {sorted(sizes)}"
        raise InputError(f"{subject}.config_groups", what, UNQUANTIZED_FIX)
    return QuantScheme("compressed-tensors", group_size=sizes.pop(), not_converted=_names(qc, ("ignore",), subject))


def _int4_group(group: object, qc: Mapping, subject: str) -> int | None:
    """The group size of one config group, None for a group that quantizes no weights (activations only)."""
    weights = group.get("weights") if isinstance(group, dict) else None
    if weights is None:
        return None
    fmt = group.get("format") or qc.get("format")
    if fmt != "pack-quantized":
        raise InputError(f"{subject}.format", f"compressed-tensors format {fmt!r} is not supported (supported: "
                         "pack-quantized, symmetric int4)", UNQUANTIZED_FIX)
    for field, wanted in (("num_bits", 4), ("type", "int"), ("symmetric", True), ("strategy", "group")):
        if weights.get(field) != wanted:
            raise InputError(f"{subject}.weights.{field}", f"{weights.get(field)!r} is not supported (supported: "
                             "symmetric 4-bit int, group strategy)", UNQUANTIZED_FIX)
    if weights.get("actorder") == "group":  # stores a weight_g_idx permutation we would have to apply
        raise InputError(f"{subject}.weights.actorder", "'group' activation ordering is not supported",
                         UNQUANTIZED_FIX)
    size = weights.get("group_size")
    if not (_positive_int(size) and size % INT4_PER_WORD == 0):
        raise InputError(f"{subject}.weights.group_size", f"{size!r} is not a positive multiple of 8",
                         "write the group size the scales were made with, e.g. 32")
    return size


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# ---------------------------------------------------------------- stored tensors


def group_weights(scheme: QuantScheme, tensors: Mapping[str, TensorInfo], where: str) -> dict[str, QuantizedWeight]:
    """Every quantized logical weight of the checkpoint (all shards' tensors, by name), each checked.
    Tensors that are not part of one are left out."""
    grouper = {"fp8": _fp8_weights, "mxfp4": _mxfp4_weights, "compressed-tensors": _int4_weights}[scheme.method]
    return {w.name: w for w in sorted(grouper(scheme, tensors, where), key=lambda w: w.name)}


def check_packed_shape(weight: QuantizedWeight, values: Sequence[int], where: str) -> None:
    """The int4 `weight_shape` tensor's stored values must be the shape its packed codes and scales make."""
    if tuple(int(v) for v in values) != weight.shape:
        raise InputError(f"{where}: tensor {weight.part('shape').name}", f"holds {[int(v) for v in values]} but "
                         f"{weight.part('packed').name} and its scales make {list(weight.shape)}", CORRUPT_FIX)


def _fail(where: str, name: str, what: str, fix: str = CORRUPT_FIX) -> InputError:
    return InputError(f"{where}: tensor {name}", what, fix)


def _fp8_weights(scheme: QuantScheme, tensors: Mapping[str, TensorInfo], where: str) -> Iterator[QuantizedWeight]:
    scales = {name[: -len("_scale_inv")]: info for name, info in tensors.items() if name.endswith(".weight_scale_inv")}
    for name, info in sorted(tensors.items()):
        if info.dtype == "F8_E4M3" and name not in scales:
            raise _fail(where, name, f"is F8_E4M3 but has no {name}_scale_inv beside it")
    for name, scale in sorted(scales.items()):
        weight = tensors.get(name)
        if weight is None or weight.dtype != "F8_E4M3":
            raise _fail(where, scale.name, f"has no F8_E4M3 weight {name} beside it"
                        + ("" if weight is None else f" ({name} is {weight.dtype})"))
        yield _fp8_weight(scheme, weight, scale, where)


def _fp8_weight(scheme: QuantScheme, weight: TensorInfo, scale: TensorInfo, where: str) -> QuantizedWeight:
    if len(weight.shape) != 2:
        raise _fail(where, weight.name, f"has shape {list(weight.shape)}; only 2-D FP8 weights are supported",
                    UNQUANTIZED_FIX)
    if scale.dtype not in FP8_SCALE_DTYPES:
        raise _fail(where, scale.name, f"is {scale.dtype}; block scales must be one of {', '.join(FP8_SCALE_DTYPES)}",
                    UNQUANTIZED_FIX)
    (rows, cols), (bo, bi) = weight.shape, scheme.block
    expected = (ceil_div(rows, bo), ceil_div(cols, bi))
    if scale.shape != expected:
        fit = fitting_block(rows, cols, scale.shape)
        fix = (f"the scales were made with weight_block_size {list(fit)}: set it in config.json's quantization_config"
               if fit else CORRUPT_FIX)
        raise _fail(where, scale.name, f"has shape {list(scale.shape)} but weight_block_size {[bo, bi]} and "
                    f"{weight.name} {list(weight.shape)} make {list(expected)}", fix)
    return QuantizedWeight(weight.name, "fp8_block", (("codes", weight), ("scale", scale)), (rows, cols),
                           block=scheme.block, scale_fmt=scheme.scale_fmt)


def _mxfp4_weights(scheme: QuantScheme, tensors: Mapping[str, TensorInfo], where: str) -> Iterator[QuantizedWeight]:
    stems = {name[: -len(suffix)] for name in tensors for suffix in ("_blocks", "_scales") if name.endswith(suffix)}
    for stem in sorted(stems):
        blocks, scales = tensors.get(stem + "_blocks"), tensors.get(stem + "_scales")
        if blocks is None or scales is None:
            present, missing = (stem + "_blocks", stem + "_scales") if scales is None else (stem + "_scales",
                                                                                            stem + "_blocks")
            raise _fail(where, present, f"has no {missing} beside it")
        if blocks.dtype != "U8" or len(blocks.shape) != 4 or blocks.shape[-1] != MXFP4_GROUP // 2:
            raise _fail(where, blocks.name, f"is {blocks.dtype}{list(blocks.shape)}; MXFP4 blocks are U8 "
                        f"(experts, rows, groups, {MXFP4_GROUP // 2})")
        if scales.dtype != "U8" or scales.shape != blocks.shape[:-1]:
            raise _fail(where, scales.name, f"is {scales.dtype}{list(scales.shape)}; {blocks.name} needs U8 "
                        f"{list(blocks.shape[:-1])}, one E8M0 scale per {MXFP4_GROUP} values")
        experts, rows, groups, _ = blocks.shape
        yield QuantizedWeight(stem, "mxfp4", (("blocks", blocks), ("scales", scales)),
                              (experts, groups * MXFP4_GROUP, rows), group_size=MXFP4_GROUP)


INT4_ROLES = (("packed", ".weight_packed"), ("scale", ".weight_scale"), ("shape", ".weight_shape"))


def _int4_weights(scheme: QuantScheme, tensors: Mapping[str, TensorInfo], where: str) -> Iterator[QuantizedWeight]:
    modules = {name[: -len(suffix)] for name in tensors for _, suffix in INT4_ROLES if name.endswith(suffix)}
    for module in sorted(modules):
        parts = {role: tensors.get(module + suffix) for role, suffix in INT4_ROLES}
        missing = [module + suffix for role, suffix in INT4_ROLES if parts[role] is None]
        if missing:
            present = next(info.name for info in parts.values() if info is not None)
            raise _fail(where, present, f"has no {' or '.join(missing)} beside it (pack-quantized weights are "
                        "stored as weight_packed, weight_scale and weight_shape)")
        if module + ".weight_zero_point" in tensors:
            raise _fail(where, module + ".weight_zero_point", "asymmetric int4 is not supported", UNQUANTIZED_FIX)
        yield _int4_weight(scheme.group_size, parts, where)


def _int4_weight(group: int, parts: dict[str, TensorInfo], where: str) -> QuantizedWeight:
    packed, scale, shape = parts["packed"], parts["scale"], parts["shape"]
    if packed.dtype != "I32" or len(packed.shape) != 2:
        raise _fail(where, packed.name, f"is {packed.dtype}{list(packed.shape)}; packed int4 is I32 (out, in/8)")
    if scale.dtype not in INT4_SCALE_DTYPES or len(scale.shape) != 2:
        raise _fail(where, scale.name, f"is {scale.dtype}{list(scale.shape)}; group scales are 2-D "
                    f"{', '.join(INT4_SCALE_DTYPES)}")
    if shape.dtype not in ("I32", "I64") or shape.shape != (2,):
        raise _fail(where, shape.name, f"is {shape.dtype}{list(shape.shape)}; weight_shape is I32 [out, in]")
    rows, cols = packed.shape[0], packed.shape[1] * INT4_PER_WORD
    if scale.shape != (rows, cols // group):
        fits = scale.shape[0] == rows and scale.shape[1] > 0 and cols % scale.shape[1] == 0
        fix = (f"the scales were made with group_size {cols // scale.shape[1]}: set it in config.json's "
               "quantization_config" if fits else CORRUPT_FIX)
        raise _fail(where, scale.name, f"has shape {list(scale.shape)} but group_size {group} and {packed.name} "
                    f"{list(packed.shape)} (in = {cols}) make {[rows, cols // group]}", fix)
    return QuantizedWeight(packed.name[: -len("_packed")], "int4_packed",
                           (("packed", packed), ("scale", scale), ("shape", shape)), (rows, cols), group_size=group)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def fitting_block(rows: int, cols: int, scale_shape: Sequence[int]) -> tuple[int, int] | None:
    """A weight_block_size that makes this scale shape (square, and the power of two nearest 128, when one
    is), or None when none does."""
    if len(scale_shape) != 2:
        return None
    options = [_block_options(n, blocks) for n, blocks in zip((rows, cols), scale_shape, strict=True)]
    if not all(options):
        return None

    def best(sizes: set[int]) -> int:
        powers = [b for b in sizes if b & (b - 1) == 0]
        return min(powers, key=lambda b: abs(b.bit_length() - 8)) if powers else min(sizes)

    square = options[0] & options[1]
    return (best(square),) * 2 if square else (best(options[0]), best(options[1]))


def _block_options(n: int, blocks: int) -> set[int]:
    """Every block size b with ceil(n / b) == blocks (any b >= n makes one block; 4096 bounds them)."""
    if n <= 0 or blocks <= 0 or blocks > n:
        return set()
    low = ceil_div(n, blocks)
    high = max(n, 4096) if blocks == 1 else (n - 1) // (blocks - 1)
    return set(range(low, high + 1)) if ceil_div(n, low) == blocks else set()
