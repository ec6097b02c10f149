"""Small real ModelOpt (NVFP4, FP8 per tensor, per channel and in blocks, MXFP8, MIXED_PRECISION) and fbgemm FP8
checkpoints built from transformers models, and the formats' published math as float64 references for a merged
weight. Nothing here uses merge_core's codecs.

The references follow NVIDIA's exporter (modelopt/torch/quantization/qtensor/nvfp4_tensor.py, fp8_tensor.py,
mxfp8_tensor.py; modelopt/torch/export/unified_export_hf.py and quant_utils.py) and FBGEMM's quantize_fp8_per_row
(fbgemm_gpu/experimental/gen_ai/src/quantize/quantize.cu), element by element in float64: each float32 quantity
those compute (a scale, a quotient) is the float64 one rounded to float32, which is the float32 operation's
correctly rounded result (53 ≥ 2·24 + 2 bits); e4m3 and e2m1 roundings are nearest-value searches with ties to
the even code. A checkpoint is what the exporter writes: the model's linears quantized, fused siblings (layers
that take one input) given one NVFP4 weight_scale_2 from the largest amax of theirs, per-tensor values stored
squeezed to [], and hf_quant_config.json (or config.json's quantization_config with quant_method "modelopt").
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from tests.quantized_models import e2m1_nearest, saved_state, write_sharded

E4M3_MAX = 448.0
NV_GROUP, MX_GROUP, PB_BLOCK = 16, 32, 128
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("q_a_proj", "kv_a_proj_with_mqa"))
INPUT_SCALE = 0.0625  # a calibrated activation scale: carried through a merge unchanged


def _e4m3_grid() -> torch.Tensor:
    """The 127 non-negative finite e4m3fn values in code order (subnormals m/8 · 2^-6, then (1 + m/8) · 2^(e-7))."""
    values = [m / 8 * 2.0 ** -6 for m in range(8)]
    values += [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16) for m in range(8) if (e, m) != (15, 7)]
    return torch.tensor(values, dtype=torch.float64)


E4M3_GRID = _e4m3_grid()


def e4m3_nearest(values: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn of float32 values: the nearest e4m3 value (ties to the even code), saturating at ±448, the sign
    kept (-0.0 for a small negative value)."""
    magnitude = values.double().abs().clamp(max=E4M3_MAX)
    lower = (torch.searchsorted(E4M3_GRID, magnitude, right=True) - 1).clamp(0, len(E4M3_GRID) - 2)
    below, above = magnitude - E4M3_GRID[lower], E4M3_GRID[lower + 1] - magnitude
    code = lower + ((above < below) | ((above == below) & (lower % 2 == 1))).long()
    return torch.copysign(E4M3_GRID[code], values.double()).to(torch.float8_e4m3fn)


def e2m1_codes(values: torch.Tensor) -> torch.Tensor:
    """NVFP4QTensor._cast_fp4: the nearest e2m1 code (ties to even), its sign bit set for values below zero
    (so -0.0 is code 0, a small negative value code 8)."""
    codes = e2m1_nearest(values)
    return torch.where(values == 0, codes & 7, codes)


def pack_low_first(codes: torch.Tensor) -> torch.Tensor:
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)


def unpack_low_first(packed: torch.Tensor) -> torch.Tensor:
    magnitudes = torch.tensor((0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0), dtype=torch.float64)
    codes = torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2).long()
    return torch.where(codes >= 8, -magnitudes[codes & 7], magnitudes[codes & 7])


def f32(values) -> torch.Tensor:
    """float64 values rounded once to float32."""
    return torch.as_tensor(values, dtype=torch.float64).to(torch.float32)


# ---------------------------------------------------------------- the formats' math, float64


def nvfp4_scale_2(weights: list[torch.Tensor]) -> torch.Tensor:
    """weight_scale_2 of a weight or of fused siblings: the largest amax / (6 · 448), float32 []."""
    return f32(max(w.double().abs().max().item() for w in weights) / (6 * E4M3_MAX))


def nvfp4_quantize(weight: torch.Tensor, scale_2: torch.Tensor | None = None, scale: torch.Tensor | None = None
                   ) -> dict[str, torch.Tensor]:
    """NVFP4QTensor.quantize of a float32 (out, in) weight: block scales amax / (6 · weight_scale_2) (0 made 1) in
    e4m3 after _cast_per_block_scale_to_fp8's clamp to [2^-9, 448], codes e2m1(W / fp32(scale · weight_scale_2))
    packed two a byte, the low nibble first."""
    scale_2 = nvfp4_scale_2([weight]) if scale_2 is None else scale_2
    w = weight.double()
    if scale is None:
        six = f32(6.0 * scale_2.double())
        block = f32(w.abs().unflatten(1, (-1, NV_GROUP)).amax(dim=-1) / six.double())
        scale = e4m3_nearest(torch.where(block == 0, torch.ones_like(block), block).clamp(min=2.0 ** -9))
    divisor = f32(scale.double() * scale_2.double()).double().repeat_interleave(NV_GROUP, dim=1)
    assert torch.all(divisor > 0)
    codes = e2m1_codes(f32(w / divisor))
    return {"weight": pack_low_first(codes), "weight_scale": scale, "weight_scale_2": scale_2}


def nvfp4_dequantize(state: dict[str, torch.Tensor]) -> torch.Tensor:
    divisor = f32(state["weight_scale"].double() * state["weight_scale_2"].double()).double()
    return f32(unpack_low_first(state["weight"]) * divisor.repeat_interleave(NV_GROUP, dim=1))


def _cells(weight: torch.Tensor, strategy: str) -> torch.Tensor:
    """The weight's amax per scale: tensor [], channel (out,), block (ceil(out/128), ceil(in/128))."""
    w = weight.double().abs()
    if strategy == "tensor":
        return w.max()
    if strategy == "channel":
        return w.amax(dim=1)
    rows, cols = math.ceil(w.shape[0] / PB_BLOCK), math.ceil(w.shape[1] / PB_BLOCK)
    return torch.tensor([[w[i * PB_BLOCK:(i + 1) * PB_BLOCK, j * PB_BLOCK:(j + 1) * PB_BLOCK].max().item()
                          for j in range(cols)] for i in range(rows)], dtype=torch.float64)


def _spread(scale: torch.Tensor, weight: torch.Tensor, strategy: str) -> torch.Tensor:
    scale = scale.double()
    if strategy == "tensor":
        return scale.reshape(()).expand(weight.shape)
    if strategy == "channel":
        return scale.reshape(-1, 1).expand(weight.shape)
    blocks = scale.reshape(math.ceil(weight.shape[0] / PB_BLOCK), -1)
    return blocks.repeat_interleave(PB_BLOCK, 0).repeat_interleave(PB_BLOCK, 1)[:weight.shape[0], :weight.shape[1]]


SCALE_SHAPES = {"tensor": lambda r, c: (), "channel": lambda r, c: (r,),
                "block": lambda r, c: (math.ceil(r / PB_BLOCK), 1, math.ceil(c / PB_BLOCK), 1)}


def fp8_quantize(weight: torch.Tensor, strategy: str, scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """FP8QTensor / to_quantized_weight: scale = amax / 448 per tensor, row or 128×128 block (1 where amax is 0),
    codes e4m3(W / scale)."""
    if scale is None:
        amax = _cells(weight, strategy)
        scale = f32(torch.where(amax > 0, amax / E4M3_MAX, 1.0)).reshape(SCALE_SHAPES[strategy](*weight.shape))
    codes = e4m3_nearest(f32(weight.double() / _spread(scale, weight, strategy)))
    return {"weight": codes, "weight_scale": scale}


def fp8_dequantize(state: dict[str, torch.Tensor], strategy: str) -> torch.Tensor:
    codes = state["weight"]
    return f32(codes.double() * _spread(state["weight_scale"], codes, strategy))


def mxfp8_quantize(weight: torch.Tensor, scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """MXFP8QTensor: per 32 values e = ceil(log2(amax / 448)) in [-127, 127] (-127 for zeros), stored e + 127;
    codes e4m3(clamp(W · 2^(127 - e)))."""
    if scale is None:
        quotient = f32(weight.double().abs().unflatten(1, (-1, MX_GROUP)).amax(dim=-1) / E4M3_MAX)
        scale = torch.tensor([[_ceil_log2(q) + 127 for q in row] for row in quotient.tolist()], dtype=torch.uint8)
    exponent = scale.double().repeat_interleave(MX_GROUP, dim=1) - 127
    return {"weight": e4m3_nearest(f32(weight.double() * torch.exp2(-exponent))), "weight_scale": scale}


def _ceil_log2(q: float) -> int:
    if q == 0:
        return -127
    mantissa, exponent = math.frexp(q)
    return max(-127, min(127, exponent - 1 if mantissa == 0.5 else exponent))


def mxfp8_dequantize(state: dict[str, torch.Tensor]) -> torch.Tensor:
    exponent = state["weight_scale"].double().repeat_interleave(MX_GROUP, dim=1) - 127
    return f32(state["weight"].double() * torch.exp2(exponent))


def fbgemm_quantize(weight: torch.Tensor, scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """quantize_fp8_per_row: s = max(amax_row / 448, fp32(1 / (448 · 512))), (out, 1); codes e4m3(W / s)."""
    if scale is None:
        floor = f32(1.0 / (E4M3_MAX * 512.0)).double()
        scale = f32(torch.maximum(f32(weight.double().abs().amax(dim=1) / E4M3_MAX).double(), floor)).reshape(-1, 1)
    return {"weight": e4m3_nearest(f32(weight.double() / scale.double())), "weight_scale": scale}


def fbgemm_dequantize(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return f32(state["weight"].double() * state["weight_scale"].double())


# algo: (quantize(weight, **kept) -> state, dequantize(state), the state's scale parts)
FORMATS: dict[str, tuple[Callable, Callable, tuple[str, ...]]] = {
    "NVFP4": (nvfp4_quantize, nvfp4_dequantize, ("weight_scale", "weight_scale_2")),
    "FP8": (lambda w, **k: fp8_quantize(w, "tensor", **k), lambda s: fp8_dequantize(s, "tensor"), ("weight_scale",)),
    "FP8_PER_CHANNEL_PER_TOKEN": (lambda w, **k: fp8_quantize(w, "channel", **k),
                                  lambda s: fp8_dequantize(s, "channel"), ("weight_scale",)),
    "FP8_PB_WO": (lambda w, **k: fp8_quantize(w, "block", **k), lambda s: fp8_dequantize(s, "block"),
                  ("weight_scale",)),
    "MXFP8": (mxfp8_quantize, mxfp8_dequantize, ("weight_scale",)),
    "fbgemm_fp8": (fbgemm_quantize, fbgemm_dequantize, ("weight_scale",)),
}
ACTIVATIONS = ("NVFP4", "FP8")  # the algos whose activations have a static scale (input_scale)


# ---------------------------------------------------------------- checkpoints


@dataclass
class ModelOptCheckpoint:
    path: str
    dequantized: dict[str, torch.Tensor]  # every tensor, bf16, the quantized weights dequantized by the reference
    exact: dict[str, torch.Tensor] = field(default_factory=dict)  # quantized weights, the reference's float32 values
    algos: dict[str, str] = field(default_factory=dict)  # quantized module -> its quant_algo


def sibling_groups(modules) -> list[list[str]]:
    """Quantized modules ModelOpt's export fuses (they take one input), each group in one quant_algo."""
    groups = []
    for names in SIBLINGS:
        for parent in sorted({m.rsplit(".", 1)[0] for m in modules if m.rsplit(".", 1)[-1] == names[0]}):
            members = [f"{parent}.{n}" for n in names if f"{parent}.{n}" in modules]
            if len(members) > 1 and len({modules[m] for m in members}) == 1:
                groups.append(members)
    return groups


def quantize_state(tensors: dict[str, torch.Tensor], algos: dict[str, str]) -> tuple[dict, dict]:
    """(the stored tensors, the exact float32 weights) with each module of `algos` quantized in its algo, NVFP4
    siblings sharing weight_scale_2, static activations an input_scale."""
    stored, exact = dict(tensors), {}
    shared = {m: nvfp4_scale_2([tensors[f"{n}.weight"].float() for n in group])
              for group in sibling_groups(algos) if algos[group[0]] == "NVFP4" for m in group}
    for module, algo in algos.items():
        quantize, dequantize, _ = FORMATS[algo]
        kept = {"scale_2": shared[module]} if module in shared else {}
        state = quantize(tensors[f"{module}.weight"].float(), **kept)
        exact[f"{module}.weight"] = dequantize(state)
        if algo in ACTIVATIONS:
            state["input_scale"] = torch.tensor(INPUT_SCALE)
        stored.update({f"{module}.{key}": value for key, value in state.items()})
    return stored, exact


def save_modelopt(path: str, model, algos: dict[str, str], *, exclude: list[str], mixed: bool = False,
                  in_config: bool = False, shards: int = 3) -> ModelOptCheckpoint:
    """`model` with `algos` ({module: quant_algo}) quantized as ModelOpt's export writes it, the settings in
    hf_quant_config.json (or, `in_config`, in config.json as convert_hf_quant_config_format writes them)."""
    tensors, config = saved_state(model)
    stored, exact = quantize_state(tensors, algos)
    if mixed:
        quantization = {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None,
                        "quantized_layers": {m: {"quant_algo": a} | ({"group_size": NV_GROUP} if a == "NVFP4" else {})
                                             for m, a in sorted(algos.items())}}
    else:
        (algo,) = set(algos.values())
        quantization = {"quant_algo": algo, "kv_cache_quant_algo": None, "exclude_modules": exclude}
        quantization |= {"group_size": NV_GROUP} if algo == "NVFP4" else {}
    if in_config:
        config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": quantization.pop("quant_algo"),
                                         "ignore": quantization.pop("exclude_modules", [])} | quantization
    write_sharded(path, stored, config, shards)
    if not in_config:
        with open(os.path.join(path, "hf_quant_config.json"), "w") as f:
            json.dump({"producer": {"name": "modelopt", "version": "0.39.0"}, "quantization": quantization}, f)
    dequantized = {n: t for n, t in tensors.items()} | {n: t.to(torch.bfloat16) for n, t in exact.items()}
    return ModelOptCheckpoint(path, dequantized, exact, dict(algos))


def decoder_linears(model, keep=lambda name: True) -> list[str]:
    """The decoder layers' linear modules (not norms, not the router), by their checkpoint names."""
    tensors, _ = saved_state(model)
    modules = [n[: -len(".weight")] for n, t in tensors.items() if n.endswith(".weight") and t.dim() == 2
               and ".layers." in n and "norm" not in n.rsplit(".", 2)[-2] and not n.endswith("mlp.gate.weight")]
    return sorted(m for m in modules if keep(m))


def save_llama(path: str, algo: str, **options) -> ModelOptCheckpoint:
    """The tests' tiny Llama with every decoder linear in `algo`, lm_head excluded (as NVIDIA's releases leave it)."""
    from tests.ct_models import llama
    model = llama()
    return save_modelopt(path, model, {m: algo for m in decoder_linears(model)}, exclude=["lm_head"], **options)


def save_fbgemm(path: str, model, modules: list[str], not_converted: list[str], shards: int = 3) -> ModelOptCheckpoint:
    """`model` with `modules` quantized as transformers' FbgemmFp8Quantize stores them, config.json's
    quantization_config as Llama-3.1-405B-Instruct-FP8's."""
    tensors, config = saved_state(model)
    algos = {m: "fbgemm_fp8" for m in modules}
    stored, exact = quantize_state(tensors, algos)
    config["quantization_config"] = {"activation_scale_ub": 1200.0, "modules_to_not_convert": not_converted,
                                     "quant_method": "fbgemm_fp8"}
    write_sharded(path, stored, config, shards)
    dequantized = dict(tensors) | {n: t.to(torch.bfloat16) for n, t in exact.items()}
    return ModelOptCheckpoint(path, dequantized, exact, algos)


def expected_parts(checkpoint: ModelOptCheckpoint, base: dict[str, torch.Tensor], merged: dict[str, torch.Tensor],
                   touched: set[str], scales: str) -> dict[str, torch.Tensor]:
    """Every stored part of the modules a merge writes again, by name: a touched weight requantized from W'
    (`merged`: PEFT's float32 merge, by logical name) by the reference, with the base's scales (keep) or fresh
    ones; NVFP4 siblings sharing one fresh weight_scale_2 from all of their W' (a sibling left alone written
    again when that scale moves)."""
    expected = {}
    groups = [g for g in sibling_groups(checkpoint.algos) if checkpoint.algos[g[0]] == "NVFP4"]
    groups += [[m] for m in checkpoint.algos if not any(m in g for g in groups)]
    for group in groups:
        if not any(f"{m}.weight" in touched for m in group):
            continue
        quantize, _, scale_parts = FORMATS[checkpoint.algos[group[0]]]
        shared = {}
        if scales == "fresh" and len(group) > 1:
            shared = {"scale_2": nvfp4_scale_2([merged[f"{m}.weight"] for m in group])}
        moved = bool(shared) and not torch.equal(shared["scale_2"], base[f"{group[0]}.weight_scale_2"])
        for module in group:
            if f"{module}.weight" not in touched and not moved:
                continue
            kept = {_keyword(p): base[f"{module}.{p}"] for p in scale_parts} if scales == "keep" else shared
            state = quantize(merged[f"{module}.weight"], **kept)
            expected.update({f"{module}.{k}": v for k, v in state.items()})
    return expected


def _keyword(part: str) -> str:
    return {"weight_scale": "scale", "weight_scale_2": "scale_2"}[part]
