"""Small real compressed-tensors checkpoints built with compressed-tensors itself, and the library's own
quantize and compress as the reference for a merged weight. Nothing here uses merge_core's codecs.

A checkpoint is made as llm-compressor makes one: a tiny transformers model in bf16, the preset schemes
applied (`preset_name_to_scheme`, `apply_quantization_config`), each weight's scales computed from a
min/max observation (`calculate_qparams`, and `generate_gparam` for NVFP4's global scale, fused siblings
given the smallest of theirs as llm-compressor does), then `ModelCompressor.compress_model`,
`save_pretrained` and `update_config`; the tensors are then written in several shards.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field

import torch

from tests.quantized_models import write_sharded

# Layers vLLM packs into one, which llm-compressor gives one global scale (its FUSED_MODULE_MAPPINGS).
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))
LLAMA = dict(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


@dataclass
class CtCheckpoint:
    path: str
    dequantized: dict[str, torch.Tensor]  # every tensor as transformers loads it decompressed (bf16)
    exact: dict[str, torch.Tensor] = field(default_factory=dict)  # quantized weights, compressed-tensors' float32
    schemes: dict[str, object] = field(default_factory=dict)  # module → its QuantizationScheme


def observe(weight: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """A min/max observer's statistics, scale-shaped, as llm-compressor's observer slices the weight."""
    w = weight.float()
    strategy = args.strategy
    if strategy == "tensor":
        return w.amin().reshape(1), w.amax().reshape(1)
    if strategy == "channel":
        return w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    if strategy in ("group", "tensor_group"):
        groups = w.unflatten(-1, (-1, args.group_size))
        return groups.amin(-1), groups.amax(-1)
    bh, bw = args.block_structure
    rows, cols = math.ceil(w.shape[0] / bh), math.ceil(w.shape[1] / bw)
    low, high = torch.empty(rows, cols), torch.empty(rows, cols)
    for i in range(rows):
        for j in range(cols):
            block = w[i * bh:(i + 1) * bh, j * bw:(j + 1) * bw]
            low[i, j], high[i, j] = block.amin(), block.amax()
    return low, high


def qparams(weight: torch.Tensor, args, global_scale=None):
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    low, high = observe(weight, args)
    return calculate_qparams(low, high, args, global_scale=global_scale)


def gparam(weights) -> torch.Tensor:
    """NVFP4's global scale for one weight, or fused siblings' shared one: the smallest of theirs."""
    from compressed_tensors.quantization.utils.helpers import generate_gparam
    return torch.min(torch.cat([generate_gparam(w.float().amin(), w.float().amax()) for w in weights])).reshape(1)


def shared_scale(weights, args):
    """Per-tensor siblings' one scale, as for the fused layer: the siblings' values seen as one tensor."""
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    low = torch.min(torch.stack([w.float().amin() for w in weights])).reshape(1)
    high = torch.max(torch.stack([w.float().amax() for w in weights])).reshape(1)
    return calculate_qparams(low, high, args)


def compressor(fmt: str):
    from compressed_tensors.compressors import BaseCompressor
    return BaseCompressor.get_value_from_registry(fmt)


def compress(weight: torch.Tensor, scheme, fmt: str, scale, zero=None, global_scale=None, scale_dtype=None,
             extra=None) -> dict[str, torch.Tensor]:
    """compressed-tensors' own compress of a float32 weight with these qparams: the module's scale
    parameter in `scale_dtype` (the model's dtype) as llm-compressor holds it."""
    state = {"weight": weight.float(), "weight_scale": scale.to(scale_dtype) if scale_dtype else scale}
    if zero is not None:
        state["weight_zero_point"] = zero
    if global_scale is not None:
        state["weight_global_scale"] = global_scale
    return compressor(fmt).compress(state | dict(extra or {}), scheme)


def decompress_exact(state: dict[str, torch.Tensor], scheme, fmt: str) -> torch.Tensor:
    """The float32 weight compressed-tensors computes before its cast to the model's dtype."""
    from compressed_tensors.compressors.mx_utils import decompress_mx_scale
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    state = dict(state)
    if fmt in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
        packed = state["weight_packed"]
        codes = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)
        scale = state["weight_scale"]
        scale = decompress_mx_scale(scale).float() if fmt.startswith("mx") else scale.float()
        return dequantize(codes, scale, args=scheme.weights, global_scale=state.get("weight_global_scale"),
                          dtype=torch.float32)
    if fmt == "mxfp8-quantized":  # its own decompress reads E8M0 bytes as bf16 scales: the naive one takes floats
        state["weight_scale"], fmt = decompress_mx_scale(state["weight_scale"]), "naive-quantized"
    state["weight_scale"] = state["weight_scale"].float()
    if fmt == "pack-quantized":
        state["weight_shape"] = state["weight_shape"].tolist()
    return compressor(fmt).decompress(state, scheme)["weight"].float()


def _siblings(modules: dict[str, object]) -> list[list[str]]:
    """Fused sibling groups among quantized module names (those present, under one parent)."""
    groups = []
    for names in SIBLINGS:
        parents = {m.rsplit(".", 1)[0] for m in modules if m.rsplit(".", 1)[-1] == names[0]}
        for parent in sorted(parents):
            members = [f"{parent}.{n}" for n in names if f"{parent}.{n}" in modules]
            if len(members) > 1:
                groups.append(members)
    return groups


def _calibrate(model, fused: bool) -> None:
    """Each quantized module's scales from its weight (global scales first, fused siblings sharing)."""
    modules = {n: m for n, m in model.named_modules()
               if getattr(m, "quantization_scheme", None) is not None and m.quantization_scheme.weights is not None}
    shared = {}
    for name, module in modules.items():
        if module.quantization_scheme.weights.strategy == "tensor_group":
            shared[name] = {"gs": gparam([module.weight.data])}
    for members in (_siblings(modules) if fused else []):
        args = modules[members[0]].quantization_scheme.weights
        if any(modules[m].quantization_scheme.weights != args for m in members):
            continue
        weights = [modules[m].weight.data for m in members]
        if args.strategy == "tensor_group":
            shared.update({m: {"gs": gparam(weights)} for m in members})
        elif args.strategy == "tensor":
            scale, zero = shared_scale(weights, args)
            shared.update({m: {"scale": scale, "zero": zero} for m in members})
    for name, module in modules.items():
        args = module.quantization_scheme.weights
        given = shared.get(name, {})
        scale, zero = qparams(module.weight.data, args, given.get("gs"))
        scale, zero = given.get("scale", scale), given.get("zero", zero)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
        if "gs" in given:
            module.weight_global_scale.data.copy_(given["gs"])
        for part, value in (("input_scale", 0.0625), ("input_global_scale", 96.0)):
            if hasattr(module, part):  # static activations: any calibrated value, carried through a merge
                getattr(module, part).data.fill_(value)


def preset(name: str, targets: list[str], **weights):
    """A preset's QuantizationScheme, its weights' args changed by `weights` (say strategy="channel")."""
    from compressed_tensors.quantization import QuantizationArgs, preset_name_to_scheme
    scheme = preset_name_to_scheme(name, targets)
    if weights:
        scheme.weights = QuantizationArgs(**(scheme.weights.model_dump() | weights))
    return scheme


def save_ct(path: str, model, groups: dict[str, tuple], ignore: list[str], shards: int = 3,
            fused: bool = True, text_config: bool = False) -> CtCheckpoint:
    """`model` quantized by presets ({group key: (preset, targets[, weights args changed])}) with
    compressed-tensors, saved in shards."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    schemes = {key: preset(name, list(targets), **(changes[0] if changes else {}))
               for key, (name, targets, *changes) in groups.items()}
    config = QuantizationConfig(config_groups=schemes, ignore=ignore, quantization_status="frozen")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_quantization_config(model, config, show_progress=False)
        _calibrate(model, fused)
        by_module = {n: m.quantization_scheme for n, m in model.named_modules()
                     if getattr(m, "quantization_scheme", None) is not None and m.quantization_scheme.weights}
        comp = ModelCompressor.from_pretrained_model(model)
        comp.compress_model(model)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            comp.update_config(tmp)
            tensors, saved_config = _read_saved(tmp)
    if text_config:  # a multimodal checkpoint's place for it (Kimi K2.5, K3)
        saved_config["text_config"] = {"quantization_config": saved_config.pop("quantization_config")}
    checkpoint = CtCheckpoint(write_sharded(path, tensors, saved_config, shards), {}, {}, by_module)
    for module, scheme in by_module.items():
        state = {k[len(module) + 1:]: v for k, v in tensors.items() if k.startswith(module + ".")}
        checkpoint.exact[module + ".weight"] = decompress_exact(state, scheme, scheme.format)
    quantized = {f"{m}.{k}" for m in by_module for k in ("weight_packed", "weight_scale", "weight_zero_point",
                                                            "weight_global_scale", "weight_shape", "input_scale",
                                                            "input_global_scale", "input_zero_point")}
    checkpoint.dequantized = {n: t for n, t in tensors.items() if n not in quantized}
    checkpoint.dequantized.update({n: t.to(torch.bfloat16) for n, t in checkpoint.exact.items()})
    return checkpoint


def _read_saved(folder: str) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file
    tensors = {}
    for file in sorted(os.listdir(folder)):
        if file.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, file)))
    with open(os.path.join(folder, "config.json")) as f:
        return tensors, json.load(f)


def random_model(model_cls, config, seed: int = 0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model_cls(config).to(torch.bfloat16)


def llama(**sizes):
    from transformers import LlamaConfig, LlamaForCausalLM
    return random_model(LlamaForCausalLM, LlamaConfig(**(LLAMA | sizes)))


def save_preset(path: str, name: str, targets=("Linear",), ignore=("lm_head",), weights=None,
                **options) -> CtCheckpoint:
    """A tiny Llama whose decoder linears are quantized by one preset (its weights' args changed by
    `weights`)."""
    return save_ct(path, llama(), {"group_0": (name, list(targets), weights or {})}, list(ignore), **options)


# ---------------------------------------------------------------- a checkpoint's state dict, quantized by name


def ct_schemes(groups: dict[str, tuple[str, list[str]]], fmt: str) -> dict:
    from compressed_tensors.quantization import preset_name_to_scheme
    schemes = {key: preset_name_to_scheme(preset, targets) for key, (preset, targets) in groups.items()}
    for scheme in schemes.values():
        scheme.format = fmt
    return schemes


def quantization_config(schemes: dict, ignore: list[str], fmt: str) -> dict:
    """config.json's quantization_config as ModelCompressor.update_config writes it."""
    from compressed_tensors.quantization import QuantizationConfig
    qc = QuantizationConfig(config_groups=schemes, ignore=ignore, format=fmt, quantization_status="compressed")
    return {"quant_method": "compressed-tensors", "sparsity_config": {}, "transform_config": {},
            **qc.model_dump(exclude=["quant_method"])}


def compress_state(tensors: dict[str, torch.Tensor], schemes: dict, ignore: list[str], fmt: str
                   ) -> tuple[dict[str, torch.Tensor], dict[str, object], dict[str, dict[str, torch.Tensor]]]:
    """(the stored tensors, module → scheme, module → its compressed state) of a state dict whose weights
    a group's targets match (match_name: names and "re:" patterns) quantized with compressed-tensors'
    compressors, fused siblings sharing global scales as llm-compressor gives them."""
    from compressed_tensors.utils.match import match_name

    modules = {}
    for name in tensors:
        module = name[: -len(".weight")]
        if name.endswith(".weight") and not any(match_name(module, i) for i in ignore):
            scheme = next((s for s in schemes.values() if any(match_name(module, t) for t in s.targets)), None)
            if scheme is not None:
                modules[module] = scheme
    shared = {}
    for members in _siblings(modules):
        if modules[members[0]].weights.strategy == "tensor_group":
            shared.update({m: gparam([tensors[m + ".weight"] for m in members]) for m in members})
    stored, states = dict(tensors), {}
    for module, scheme in modules.items():
        weight = stored.pop(module + ".weight").float()
        gs = shared.get(module, gparam([weight]) if scheme.weights.strategy == "tensor_group" else None)
        scale, zero = qparams(weight, scheme.weights, gs)
        states[module] = compress(weight, scheme, fmt, scale, None if scheme.weights.symmetric else zero, gs,
                                  torch.bfloat16)
        stored.update({f"{module}.{k}": v for k, v in states[module].items()})
    return stored, modules, states


def save_ct_state(path: str, tensors: dict[str, torch.Tensor], config: dict, groups: dict[str, tuple[str, list[str]]],
                  ignore: list[str], fmt: str, shards: int = 3) -> CtCheckpoint:
    """A saved state dict (say a MoE's per-expert weights, which transformers 5 holds fused in memory, out
    of apply_quantization_config's reach) quantized weight by weight (compress_state)."""
    schemes = ct_schemes(groups, fmt)
    stored, modules, states = compress_state(tensors, schemes, ignore, fmt)
    checkpoint = CtCheckpoint(path, {}, {}, modules)
    for module, scheme in modules.items():
        checkpoint.exact[module + ".weight"] = decompress_exact(states[module], scheme, fmt)
    write_sharded(path, stored, dict(config) | {"quantization_config": quantization_config(schemes, ignore, fmt)},
                  shards)
    checkpoint.dequantized = dict(tensors) | {n: t.to(torch.bfloat16) for n, t in checkpoint.exact.items()}
    return checkpoint


# ---------------------------------------------------------------- what a merge must store


TENSOR_LEVEL = {"tensor_group": ("weight_global_scale",), "tensor": ("weight_scale", "weight_zero_point")}


def expected_parts(checkpoint: CtCheckpoint, base: dict[str, torch.Tensor], merged: dict[str, torch.Tensor],
                   touched: set[str], scales: str) -> dict[str, torch.Tensor]:
    """Every stored tensor of every quantized module after a merge, by name: a weight the adapters leave
    alone as the base stores it; a touched one as compressed-tensors compresses W' (`merged`, by logical
    name: PEFT's float32 merge), with the base's qparams (keep), or fresh ones from a min/max observation,
    fused siblings whose base shares a tensor-level scale sharing one for all of them (a sibling left
    alone keeping its bytes unless that scale moved)."""
    expected = {}
    for group in _tied(checkpoint, base):
        scheme = checkpoint.schemes[group[0]]
        if not any(m + ".weight" in touched for m in group):
            continue
        shared, moved = ({}, False) if scales == "keep" else _shared(scheme, group, base, merged)
        for module in group:
            if module + ".weight" not in touched and not moved:
                continue
            state = _kept(scheme, module, base) if scales == "keep" else _fresh(scheme, merged[module + ".weight"],
                                                                               shared)
            state = compress(merged[module + ".weight"], scheme, scheme.format, **state)
            expected.update({f"{module}.{k}": v for k, v in state.items()})
    return expected


def _tied(checkpoint: CtCheckpoint, base: dict[str, torch.Tensor]) -> list[list[str]]:
    """Each quantized module alone, or with the fused siblings whose base stores equal tensor-level scales."""
    groups, grouped = [], set()
    for members in _siblings(checkpoint.schemes):
        strategy = checkpoint.schemes[members[0]].weights.strategy
        keys = [k for k in TENSOR_LEVEL.get(strategy, ()) if f"{members[0]}.{k}" in base]
        if keys and all(torch.equal(base[f"{m}.{k}"], base[f"{members[0]}.{k}"]) for m in members for k in keys):
            groups.append(members)
            grouped.update(members)
    return groups + [[m] for m in checkpoint.schemes if m not in grouped]


def _shared(scheme, group, base, merged) -> tuple[dict, bool]:
    """The siblings' fresh tensor-level qparams, and whether they moved from the base's."""
    weights = [merged[m + ".weight"] for m in group]
    if len(group) == 1:
        return {}, False
    if scheme.weights.strategy == "tensor_group":
        gs = gparam(weights)
        return {"global_scale": gs}, not torch.equal(gs, base[f"{group[0]}.weight_global_scale"])
    scale, zero = shared_scale(weights, scheme.weights)
    stored = base[f"{group[0]}.weight_scale"]
    return {"scale": scale, "zero": zero}, not torch.equal(scale.to(stored.dtype), stored)


def _fresh(scheme, weight: torch.Tensor, shared: dict) -> dict:
    args = scheme.weights
    gs = shared.get("global_scale", gparam([weight]) if args.strategy == "tensor_group" else None)
    scale, zero = qparams(weight, args, gs)
    scale, zero = shared.get("scale", scale), shared.get("zero", zero)
    return {"scale": scale, "zero": None if args.symmetric else zero, "global_scale": gs,
            "scale_dtype": _param_dtype(scheme)}


def _kept(scheme, module: str, base: dict[str, torch.Tensor]) -> dict:
    """The base's own qparams, as a module holds them once loaded (E8M0 bytes as powers of two, packed
    zero points unpacked)."""
    from compressed_tensors.compressors.mx_utils import decompress_mx_scale
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    scale, zero = base[f"{module}.weight_scale"], base.get(f"{module}.weight_zero_point")
    if scale.dtype == torch.uint8:
        scale = decompress_mx_scale(scale)
    if zero is not None and zero.dtype == torch.int32:
        rows = int(base[f"{module}.weight_shape"][0])
        zero = unpack_from_int32(zero, scheme.weights.num_bits, torch.Size((rows, scale.shape[-1])), packed_dim=0)
    return {"scale": scale.float() if scale.dtype == torch.float8_e4m3fn else scale, "zero": zero,
            "global_scale": base.get(f"{module}.weight_global_scale")}


def _param_dtype(scheme):
    """The module's weight_scale parameter in llm-compressor: the model's dtype (bf16); NVFP4 and MX
    scales are rounded to their own dtype by calculate_qparams already."""
    return None if scheme.weights.scale_dtype is not None else torch.bfloat16
