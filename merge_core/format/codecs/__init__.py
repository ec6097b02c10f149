"""The quantized formats lora-merge keeps a weight in: one codec each (a file here implementing
merge_core.format.quantization.Codec, and a line in CODECS), and the entry points the rest of the
project uses, none of which names a format.

    scheme = read_scheme(config, where)              # config.json's quantization_config, or None
    weights = group_weights(scheme, infos, where)    # the quantized weights among the stored tensors
    weight = decode(w, parts)                        # float32, exact: code × scale
    parts = encode(w, merged)                        # each part with its stored dtype and shape
    parts = encode(w, merged, scales_from=base)      # the base's scales kept, only the codes computed

encode requantizes with the reference quantizer of each format, fresh scales included. Keeping the
base's scales (scales_from) gives the weight back bit for bit when unchanged, whatever made its scales
(quantization-aware training, an older quantizer), and scales do not drift on requantization (INT4's
amax / 7.5 moves every scale by 16/15 or 14/15 otherwise); values past a block's range saturate.

Torch-free to import: the driver reads config.json and the headers through it; the tensor entry
points load torch when first called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from merge_core.errors import InputError
from merge_core.format.codecs import fp8_block, int4_packed, mxfp4
from merge_core.format.codecs.checks import UNQUANTIZED_FIX
from merge_core.format.codecs.deferred import tensors
from merge_core.format.header import TensorInfo
from merge_core.format.quantization import Codec, QuantizedWeight, QuantScheme

if TYPE_CHECKING:
    import torch

CODECS: dict[str, Codec] = {codec.name: codec for codec in (fp8_block.CODEC, mxfp4.CODEC, int4_packed.CODEC)}
_BY_METHOD = {codec.quant_method: codec for codec in CODECS.values()}
QUANT_METHODS = tuple(_BY_METHOD)


def codec_of(weight: QuantizedWeight) -> Codec:
    return CODECS[weight.codec]


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
    codec = _BY_METHOD.get(qc.get("quant_method"))
    if codec is None:
        raise InputError(f"{subject}.quant_method", f"quantization {qc.get('quant_method')!r} is not supported "
                         f"(supported: {', '.join(QUANT_METHODS)})", UNQUANTIZED_FIX)
    return codec.read_scheme(qc, subject)


def group_weights(scheme: QuantScheme, infos: Mapping[str, TensorInfo], where: str) -> dict[str, QuantizedWeight]:
    """Every quantized logical weight of the checkpoint (all shards' tensors, by name), each checked.
    Tensors that are not part of one are left out."""
    weights = _BY_METHOD[scheme.method].group(scheme, infos, where)
    return {w.name: w for w in sorted(weights, key=lambda w: w.name)}


def describe(scheme: QuantScheme) -> str:
    """The base's format as a user names it, e.g. 'fp8 e4m3, 128×128 blocks'."""
    return _BY_METHOD[scheme.method].describe(scheme)


def check_stored(weight: QuantizedWeight, parts: Mapping[str, torch.Tensor], where: Mapping[str, str]) -> None:
    """What the headers do not show, checked once the parts are read (`where`: each part's file by role)."""
    codec_of(weight).check_stored(weight, parts, where)


def decode(weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The float32 logical weight, `weight.shape`, from its stored parts by role."""
    codec = codec_of(weight)
    _check_parts(weight, parts, roles=[role for role, _ in weight.parts if role not in codec.described_by])
    return codec.decode(weight, parts)


def encode(weight: QuantizedWeight, merged: torch.Tensor,
           scales_from: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The stored parts by role, each with the stored dtype and shape, for a float32 logical weight.
    With `scales_from` (the base's parts), its scales are kept and only the codes are recomputed."""
    if tuple(merged.shape) != weight.shape:
        raise ValueError(f"{weight.name}: merged shape {tuple(merged.shape)} is not {weight.shape}")
    codec = codec_of(weight)
    kept = None
    if scales_from is not None:
        _check_parts(weight, scales_from, roles=[codec.scale_role])
        kept = scales_from[codec.scale_role]
    parts = codec.encode(weight, merged, kept)
    _check_parts(weight, parts, roles=[role for role, _ in weight.parts])
    return parts


def step(weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """float32, `weight.shape`: the spacing of the format's values around each stored element, scaled.
    The final task's spot check allows a merged quantized weight that much from the exact merge."""
    return codec_of(weight).step(weight, parts)


def _check_parts(weight: QuantizedWeight, parts: Mapping[str, torch.Tensor], roles: list[str]) -> None:
    """Each part has the stored dtype and shape: a mix-up here would write a corrupt checkpoint silently."""
    for role in roles:
        info = weight.part(role)
        tensor = parts.get(role)
        if tensor is None or tensor.dtype != tensors.TORCH_DTYPES[info.dtype] or tuple(tensor.shape) != info.shape:
            got = "missing" if tensor is None else f"{tensor.dtype}{list(tensor.shape)}"
            raise ValueError(f"{weight.name}: part {role} ({info.name}) is {got}, stored as {info.dtype}"
                             f"{list(info.shape)}")
