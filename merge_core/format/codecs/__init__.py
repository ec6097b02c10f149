"""The quantized formats lora-merge keeps a weight in: one codec each (a file here implementing
merge_core.format.quantization.Codec, and a line in CODECS), the quant_methods that name them (METHODS),
and the entry points the rest of the project uses, none of which names a format.

    scheme = read_scheme(config, where, beside)      # config.json's quantization_config (or a file beside it)
    weights = group_weights(scheme, infos, where)    # the quantized weights among the stored tensors
    weight = decode(w, parts)                        # float32, exact: code × scale
    parts = encode(w, merged, stored)                # fresh scales, as the format's reference quantizer
    parts = encode(w, merged, stored, keep=True)     # the base's scales kept, only the codes computed

Fresh scales follow each format's reference quantizer. Keeping the base's scales, zero points and global
scales (--scales keep) gives an unchanged weight back bit for bit, whatever made its scales
(quantization-aware training, an older quantizer), and scales do not drift on requantization (a 4-bit
amax / 7.5 moves every scale by 16/15 or 14/15 otherwise); values past a scale's range saturate.

A quant_method without a codec (GPTQ, AWQ, bitsandbytes, ...) is no error: its tensors are
copied as they are, and only an adapter on one of its quantized weights is refused (the planner asks
`format_of` for the words).

Torch-free to import: the driver reads config.json and the headers through it; the tensor entry
points load torch when first called.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Mapping, Sequence

from merge_core.errors import InputError
from merge_core.format.codecs import compressed_tensors, fbgemm_fp8, fp8_block, modelopt, mxfp4
from merge_core.format.codecs.deferred import tensors
from merge_core.format.header import TensorInfo
from merge_core.format.quantization import Codec, Method, QuantizedWeight, QuantScheme

if TYPE_CHECKING:
    import torch

CODECS: dict[str, Codec] = {codec.name: codec for codec in (fp8_block.CODEC, mxfp4.CODEC,
                                                            *compressed_tensors.FORMAT_CODECS,
                                                            *modelopt.FORMAT_CODECS, fbgemm_fp8.CODEC)}
METHODS: dict[str, Method] = {method.quant_method: method for method in (fp8_block.CODEC, mxfp4.CODEC,
                                                                          compressed_tensors.METHOD, modelopt.METHOD,
                                                                          fbgemm_fp8.CODEC)}
QUANT_METHODS = tuple(METHODS)
FORMATS = ("fp8 (block-scaled)", "mxfp4 (GPT-OSS)", *(f"compressed-tensors {fmt}" for codec in
                                                      compressed_tensors.FORMAT_CODECS for fmt in codec.formats),
           *(f"modelopt {algo}" for algo in modelopt.ALGOS), "fbgemm_fp8")
# Files beside config.json that declare a format when config.json has no quantization_config
CONFIG_FILES = tuple(method.config_file for method in METHODS.values() if method.config_file)
UNCODED_FIX = "merge with an unquantized (bf16) base, or an adapter that leaves this module alone"


def codec_of(weight: QuantizedWeight) -> Codec:
    return CODECS[weight.codec]


def read_scheme(config: Mapping, where: str, beside: Mapping[str, tuple[object, str]] | None = None
                ) -> QuantScheme | None:
    """The base's quantization scheme from config.json, None when it has none. Multimodal configs
    (Kimi K2.5, K3) keep it under text_config. A quant_method without a codec reads as a scheme whose
    weights are all `uncoded`. `beside`: the CONFIG_FILES the base has, each (its parsed JSON, where it
    is), read when config.json declares no format, and recorded in the scheme when it declares theirs."""
    subject = f"{where}: quantization_config"
    qc = config.get("quantization_config")
    if qc is None and isinstance(config.get("text_config"), dict):
        qc = config["text_config"].get("quantization_config")
        subject = f"{where}: text_config.quantization_config"
    beside = beside or {}
    if qc is None:
        method = next((m for m in METHODS.values() if m.config_file in beside), None)
        return None if method is None else _with_file(method.read_config_file(*beside[method.config_file]), method)
    if not isinstance(qc, dict):
        raise InputError(subject, f"{qc!r} is not a JSON object", "fix config.json")
    method = METHODS.get(qc.get("quant_method"))
    if method is None:
        return QuantScheme(str(qc.get("quant_method")), uncoded=(str(qc.get("quant_method")),))
    scheme = method.read_scheme(qc, subject)
    return _with_file(scheme, method) if method.config_file in beside else scheme


def _with_file(scheme: QuantScheme, method: Method) -> QuantScheme:
    return dataclasses.replace(scheme, config_files=(method.config_file,))


def group_weights(scheme: QuantScheme, infos: Mapping[str, TensorInfo], where: str) -> dict[str, QuantizedWeight]:
    """Every quantized logical weight lora-merge has a codec for (all shards' tensors, by name), each
    checked. Tensors that are not part of one are left out."""
    method = METHODS.get(scheme.method)
    weights = method.group(scheme, infos, where) if method is not None else ()
    return {w.name: w for w in sorted(weights, key=lambda w: w.name)}


def describe(scheme: QuantScheme) -> str:
    """The base's format as a user names it, e.g. 'fp8 e4m3, 128×128 blocks'."""
    method = METHODS.get(scheme.method)
    if method is None:
        return f"{scheme.method} (no codec: its tensors are copied as they are)"
    return method.describe(scheme)


def format_of(scheme: QuantScheme, module: str) -> str:
    """The format a module without a codec is stored in, for the line that refuses an adapter on it."""
    method = METHODS.get(scheme.method)
    return method.format_of(scheme, module) if method is not None else scheme.method


def check_stored(weight: QuantizedWeight, parts: Mapping[str, torch.Tensor], where: Mapping[str, str]) -> None:
    """What the headers do not show, checked once the parts are read (`where`: each part's file by role)."""
    codec_of(weight).check_stored(weight, parts, where)


def decode(weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The float32 logical weight, `weight.shape`, from its stored parts by role."""
    codec = codec_of(weight)
    _check_parts(weight, parts, roles=[r for r in weight.roles if r not in codec.described_by + codec.passed_through])
    return codec.decode(weight, parts)


def encode(weight: QuantizedWeight, merged: torch.Tensor, stored: Mapping[str, torch.Tensor], *,
           keep: bool = False, fixed: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The stored parts by role, each with the stored dtype and shape, for a float32 logical weight.
    `stored`: the base's parts. With `keep`, its scales (zero points, global scales) are kept and only the
    codes computed; `fixed`: parts given their values (siblings' shared tensor-level scale)."""
    if tuple(merged.shape) != weight.shape:
        raise ValueError(f"{weight.name}: merged shape {tuple(merged.shape)} is not {weight.shape}")
    codec = codec_of(weight)
    carried = codec.described_by + codec.passed_through + (codec.scale_roles if keep else ())
    given = {role: stored[role] for role in weight.roles if role in carried} | dict(fixed or {})
    _check_parts(weight, given, roles=list(given))
    parts = codec.encode(weight, merged, given)
    _check_parts(weight, parts, roles=list(weight.roles))
    return {role: parts[role] for role in weight.roles}


def step(weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """float32, `weight.shape`: the spacing of the format's values around each stored element, scaled.
    The final task's spot check allows a merged quantized weight that much from the exact merge."""
    return codec_of(weight).step(weight, parts)


def reach(weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """float32, `weight.shape`: the lowest and highest value each element can hold with these scales."""
    return codec_of(weight).reach(weight, parts)


def rows(weight: QuantizedWeight, parts: Mapping[str, torch.Tensor], rows: Sequence[int]
         ) -> tuple[QuantizedWeight, dict[str, torch.Tensor], list[int]]:
    """(a weight, its parts, where each of `rows` is in it): those rows alone as a weight of the same
    format, so that decode, step and reach work on them only, or the whole weight where the format's
    parts do not come apart by rows."""
    cut = codec_of(weight).rows(weight, parts, rows)
    return (*cut, list(range(len(rows)))) if cut is not None else (weight, dict(parts), list(rows))


def tensor_level(weight: QuantizedWeight) -> tuple[str, ...]:
    """The parts holding one value for the whole weight (a per-tensor scale, NVFP4's global scale)."""
    return codec_of(weight).tensor_level(weight)


def tensor_level_for(weight: QuantizedWeight, low: torch.Tensor, high: torch.Tensor) -> dict[str, torch.Tensor]:
    """Those parts, fresh, for values spanning [low, high] (fused siblings seen as one tensor)."""
    parts = codec_of(weight).tensor_level_for(weight, low, high)
    _check_parts(weight, parts, roles=list(parts))
    return parts


def _check_parts(weight: QuantizedWeight, parts: Mapping[str, torch.Tensor], roles: list[str]) -> None:
    """Each part has the stored dtype and shape: a mix-up here would write a corrupt checkpoint silently."""
    for role in roles:
        info = weight.part(role)
        tensor = parts.get(role)
        if tensor is None or tensor.dtype != tensors.TORCH_DTYPES[info.dtype] or tuple(tensor.shape) != info.shape:
            got = "missing" if tensor is None else f"{tensor.dtype}{list(tensor.shape)}"
            raise ValueError(f"{weight.name}: part {role} ({info.name}) is {got}, stored as {info.dtype}"
                             f"{list(info.shape)}")
