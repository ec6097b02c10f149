"""Small real quantized checkpoints built from transformers models, and independent references for their formats.

The references are written here, apart from merge_core/format/codecs, the way the formats are specified: the
FP8 block quantizer in float64 block by block, MXFP4 rounding as a nearest-value search over the 16 e2m1
values. INT4 uses compressed-tensors itself and MXFP4 dequantization transformers' convert_moe_packed_tensors.

Every builder makes a tiny real model with random bf16 weights, takes the state dict transformers' own
save_pretrained writes (the real checkpoint names), quantizes what the real checkpoints quantize with the
reference, and writes several shards with safetensors plus model.safetensors.index.json and a config.json
carrying the real quantization_config. Shards split the sorted names in contiguous runs, so a weight and
its scale may land in different shards, as they can in real checkpoints.
"""

from __future__ import annotations

import glob
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
DEEPSEEK_TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                     n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1,
                     q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                     max_position_embeddings=64)
KIMI_IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"]
GPT_OSS_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


@dataclass
class QuantizedCheckpoint:
    path: str
    # Every tensor of the model by the name save_pretrained gives it, bf16, the quantized ones dequantized by the
    # reference: the base PEFT would merge into, what transformers loads with dequantize=True (for FP8 only when
    # the blocks are whole: transformers 5.24 gets partial edge blocks wrong or refuses them).
    dequantized: dict[str, torch.Tensor]
    # The quantized weights only, by logical name, as the reference's exact float32 values.
    exact: dict[str, torch.Tensor] = field(default_factory=dict)


# ---------------------------------------------------------------- references


def fp8_reference_quantize(weight: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype = torch.float32,
                           ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's block quantizer in float64, one block at a time. The float32 scale is amax / 448 rounded once
    (float64 division then float32 rounding is correctly rounded: 53 >= 2*24 + 2)."""
    rows, cols = weight.shape
    bo, bi = block
    w = weight.double()
    codes = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale = torch.empty(math.ceil(rows / bo), math.ceil(cols / bi), dtype=scale_dtype)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = w[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi]
            s = float(torch.tensor(max(tile.abs().max().item(), 1e-12) / 448.0, dtype=torch.float32))
            if ue8m0:
                s = 2.0 ** _ceil_log2(s)
            stored = torch.tensor(s, dtype=torch.float32).to(scale_dtype)
            scale[i, j] = stored
            codes[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi] = (tile / stored.double()).clamp(-448, 448)
    return codes, scale


def fp8_reference_dequantize(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """code × scale exactly in float64, rounded once to float32, block by block."""
    bo, bi = block
    out = torch.empty(codes.shape, dtype=torch.float64)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = codes[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi].double()
            out[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi] = tile * scale[i, j].double()
    return out.float()


def e2m1_nearest(values: torch.Tensor, ties: str = "even") -> torch.Tensor:
    """4-bit e2m1 codes by search over the 8 magnitudes in float64: nearest, saturating at 6, ties to the even
    code (or away from zero); the sign bit from the value's sign, -0.0 included."""
    grid = torch.tensor(E2M1, dtype=torch.float64)
    magnitude = values.double().abs().clamp(max=6.0)
    distance = (magnitude.unsqueeze(-1) - grid).abs()
    nearest = distance.min(dim=-1, keepdim=True).values
    candidates = distance == nearest  # one or two adjacent codes
    index = torch.arange(8).expand_as(candidates)
    lower = torch.where(candidates, index, 99).min(dim=-1).values
    upper = torch.where(candidates, index, -1).max(dim=-1).values
    if ties == "even":
        code = torch.where(lower % 2 == 0, lower, upper)
    else:
        code = upper
    sign = torch.signbit(values).to(torch.int64) << 3
    return (sign | code).to(torch.uint8)


def mxfp4_reference_quantize(logical: torch.Tensor, ties: str = "even") -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks (E, R, G, 16), scales (E, R, G)) of a logical (E, G*32, R) weight: per group the float32 amax / 6
    rounded up to the nearest normal power of two (from frexp; 0 stays 0, byte 0), values times its inverse,
    nearest e2m1."""
    x = logical.transpose(1, 2).float()  # (E, R, K)
    experts, rows, columns = x.shape
    groups = x.reshape(experts, rows, columns // 32, 32)
    quotient = groups.abs().amax(dim=-1) / 6.0  # float32, as the reference computes it
    exponents = torch.tensor([_ceil_log2(q) for q in quotient.double().flatten().tolist()]).view(quotient.shape)
    scaled = groups.double() * torch.where(quotient > 0, 2.0 ** -exponents.double(), 0.0).unsqueeze(-1)
    codes = e2m1_nearest(scaled, ties).to(torch.int64)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (exponents + 127).clamp(min=0).to(torch.uint8)


def _ceil_log2(q: float) -> int:
    """ceil(log2 q), at least -126 (float32's smallest normal exponent); -127 (byte 0) for 0."""
    if q == 0:
        return -127
    mantissa, exponent = math.frexp(q)  # q = mantissa * 2^exponent, mantissa in [0.5, 1)
    return max(exponent - 1 if mantissa == 0.5 else exponent, -126)


def mxfp4_reference_dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """transformers' own dequantization, float32 (E, G*32, R)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    return convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=torch.float32)


def int4_args(group_size: int = 32):
    from compressed_tensors.quantization import QuantizationArgs
    return QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)


def int4_reference_quantize(weight: torch.Tensor, group_size: int = 32,
                            scale_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors: calculate_qparams on the groups' min/max, the scale stored in the module's dtype,
    quantize against the stored scale, pack_to_int32."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    args = int4_args(group_size)
    groups = weight.float().unflatten(-1, (-1, group_size))
    scale, zero = calculate_qparams(groups.amin(dim=-1), groups.amax(dim=-1), args)
    scale = scale.to(scale_dtype)
    codes = quantize(x=weight.float(), scale=scale, zero_point=zero, args=args, dtype=torch.int8)
    return pack_to_int32(codes, 4), scale


def int4_reference_dequantize(packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int],
                              group_size: int = 32) -> torch.Tensor:
    """compressed-tensors' unpack_from_int32 + dequantize, in the scale's dtype (bf16), as it loads them."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    return dequantize(x_q=unpack_from_int32(packed, 4, torch.Size(shape)), scale=scale, args=int4_args(group_size))


# ---------------------------------------------------------------- writing checkpoints


def saved_state(model) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and config save_pretrained writes: the checkpoint names and layout of real bases."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp)
        tensors = {}
        for file in sorted(glob.glob(os.path.join(tmp, "*.safetensors"))):
            tensors.update(load_file(file))
        with open(os.path.join(tmp, "config.json")) as f:
            return tensors, json.load(f)


def write_sharded(path: str, tensors: dict[str, torch.Tensor], config: dict, shards: int = 3) -> str:
    """safetensors shards (contiguous runs of the sorted names), the index, and config.json."""
    os.makedirs(path, exist_ok=True)
    names = sorted(tensors)
    per_shard = math.ceil(len(names) / shards)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = names[i * per_shard:(i + 1) * per_shard]
        save_file({n: tensors[n].contiguous() for n in chunk}, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in chunk})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return path


def save_dequantized(checkpoint: QuantizedCheckpoint, path: str) -> str:
    """The dequantized base as a plain bf16 checkpoint (config without quantization_config), for PEFT."""
    with open(os.path.join(checkpoint.path, "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config", None)
    return write_sharded(path, checkpoint.dequantized, config, shards=1)


def _random_model(model_cls, config, seed: int):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model_cls(config).to(torch.bfloat16)


# ---------------------------------------------------------------- FP8 block-scaled


def _fp8_checkpoint(path: str, model, quantized: Callable[[str], bool], block, scale_fmt, scale_dtype, not_converted,
                    shards: int) -> QuantizedCheckpoint:
    tensors, config = saved_state(model)
    stored, dequantized, exact = dict(tensors), dict(tensors), {}
    for name in [n for n in tensors if quantized(n)]:
        codes, scale = fp8_reference_quantize(tensors[name].float(), block, scale_dtype, scale_fmt == "ue8m0")
        stored[name], stored[name + "_scale_inv"] = codes, scale
        exact[name] = fp8_reference_dequantize(codes, scale, block)
        dequantized[name] = exact[name].to(torch.bfloat16)
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": list(block)}
    if scale_fmt == "ue8m0":
        config["quantization_config"]["scale_fmt"] = "ue8m0"
    if not_converted:
        config["quantization_config"]["modules_to_not_convert"] = list(not_converted)
    return QuantizedCheckpoint(write_sharded(path, stored, config, shards), dequantized, exact)


def _is_linear_weight(name: str) -> bool:
    """The decoder layers' linear weights (q_proj ... kv_a_proj_with_mqa ... experts), not norms or the router."""
    module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
    return (".layers." in name and name.endswith(".weight") and "norm" not in module
            and not name.endswith("mlp.gate.weight"))


def save_fp8_llama(path: str, block: tuple[int, int] = (128, 128), scale_fmt: str = "float",
                   scale_dtype: torch.dtype = torch.float32, seed: int = 0, shards: int = 3,
                   **sizes) -> QuantizedCheckpoint:
    """A tiny Llama, its decoder linears FP8 e4m3 with block scales. The default sizes are not multiples of
    the block, so edge blocks are partial (q/o 160x160, k/v 80x160, gate/up 200x160, down 160x200)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = dict(vocab_size=96, hidden_size=160, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64) | sizes
    model = _random_model(LlamaForCausalLM, LlamaConfig(**dims), seed)
    return _fp8_checkpoint(path, model, _is_linear_weight, block, scale_fmt, scale_dtype,
                           ["lm_head", "model.embed_tokens"], shards)


def save_fp8_deepseek_v3(path: str, block: tuple[int, int] = (128, 128), scale_fmt: str = "float",
                         scale_dtype: torch.dtype = torch.float32, seed: int = 0, shards: int = 3,
                         **sizes) -> QuantizedCheckpoint:
    """A tiny DeepSeek-V3 (layer 0 dense, layer 1 MoE with 4 routed experts and a shared one), every attention,
    MLP and expert linear FP8 as in DeepSeek-V3's release; the router (mlp.gate), norms, embeddings and head
    stay bf16, and the config has no modules_to_not_convert, as the real one."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    model = _random_model(DeepseekV3ForCausalLM, DeepseekV3Config(**(DEEPSEEK_TINY | sizes)), seed)
    return _fp8_checkpoint(path, model, _is_linear_weight, block, scale_fmt, scale_dtype, None, shards)


# ---------------------------------------------------------------- MXFP4 experts


def save_mxfp4_gpt_oss(path: str, seed: int = 0, shards: int = 3, ties: str = "even") -> QuantizedCheckpoint:
    """A tiny GPT-OSS whose experts' gate_up_proj / down_proj are stored as MXFP4 `_blocks` and `_scales`
    (biases, attention, router, embeddings and head bf16), with openai/gpt-oss-20b's quantization_config."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(vocab_size=96, hidden_size=64, intermediate_size=32, head_dim=16, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          num_local_experts=4, num_experts_per_tok=2,
                          layer_types=["sliding_attention", "full_attention"])
    tensors, saved_config = saved_state(_random_model(GptOssForCausalLM, config, seed))
    stored, dequantized, exact = dict(tensors), dict(tensors), {}
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = mxfp4_reference_quantize(tensors[name].float(), ties)
        del stored[name]
        stored[name + "_blocks"], stored[name + "_scales"] = blocks, scales
        exact[name] = mxfp4_reference_dequantize(blocks, scales)
        dequantized[name] = exact[name].to(torch.bfloat16)
    saved_config["quantization_config"] = {"modules_to_not_convert": GPT_OSS_NOT_CONVERTED, "quant_method": "mxfp4"}
    return QuantizedCheckpoint(write_sharded(path, stored, saved_config, shards), dequantized, exact)


# ---------------------------------------------------------------- INT4 pack-quantized (compressed-tensors)


def kimi_quantization_config(group_size: int = 32) -> dict:
    """Kimi-K2-Thinking's quantization_config (routed experts int4, the rest ignored)."""
    weights = {"actorder": None, "block_structure": None, "dynamic": False, "group_size": group_size, "num_bits": 4,
               "observer": "minmax", "observer_kwargs": {}, "strategy": "group", "symmetric": True, "type": "int"}
    return {"config_groups": {"group_0": {"input_activations": None, "output_activations": None,
                                          "targets": ["Linear"], "weights": weights}},
            "format": "pack-quantized", "ignore": list(KIMI_IGNORE), "kv_cache_scheme": None,
            "quant_method": "compressed-tensors", "quantization_status": "compressed"}


def save_int4_kimi_style(path: str, group_size: int = 32, seed: int = 0, shards: int = 3,
                         **sizes) -> QuantizedCheckpoint:
    """A tiny DeepSeek-V3-architecture MoE (Kimi K2's) whose routed experts' linears are compressed-tensors
    pack-quantized int4, weight_shape I32 as Kimi stores it; attention, shared experts, the dense MLP, router,
    embeddings and head bf16."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    model = _random_model(DeepseekV3ForCausalLM, DeepseekV3Config(**(DEEPSEEK_TINY | sizes)), seed)
    tensors, config = saved_state(model)
    stored, dequantized, exact = dict(tensors), dict(tensors), {}
    for name in [n for n in tensors if ".mlp.experts." in n and n.endswith("_proj.weight")]:
        weight = tensors[name]
        packed, scale = int4_reference_quantize(weight.float(), group_size, weight.dtype)
        module = name[: -len(".weight")]
        del stored[name]
        stored[module + ".weight_packed"], stored[module + ".weight_scale"] = packed, scale
        stored[module + ".weight_shape"] = torch.tensor(list(weight.shape), dtype=torch.int32)
        dequantized[name] = int4_reference_dequantize(packed, scale, tuple(weight.shape), group_size)
        exact[name] = int4_reference_dequantize(packed, scale.float(), tuple(weight.shape), group_size)
    config["quantization_config"] = kimi_quantization_config(group_size)
    return QuantizedCheckpoint(write_sharded(path, stored, config, shards), dequantized, exact)


# ---------------------------------------------------------------- reading them back


def stored_tensors(path: str) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        tensors.update(load_file(file))
    return tensors


def read_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def tensor_infos(path: str) -> dict:
    """name -> TensorInfo of every shard, parsed by merge_core's own header parser."""
    from merge_core.format.header import LENGTH_PREFIX_BYTES, header_length, parse_header

    infos = {}
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with open(file, "rb") as f:
            data = f.read()
        length = header_length(data[:LENGTH_PREFIX_BYTES], len(data), file)
        header = parse_header(data[LENGTH_PREFIX_BYTES:LENGTH_PREFIX_BYTES + length], len(data), file)
        infos.update({info.name: info for info in header.tensors})
    return infos


def infos_of(*entries: tuple[str, str, tuple[int, ...]]) -> dict:
    """name -> TensorInfo of tensors (name, dtype, shape) stored one after another, as a header lists them."""
    from merge_core.format.header import DTYPE_BYTES, TensorInfo

    out, position = {}, 0
    for name, dtype, shape in entries:
        size = DTYPE_BYTES[dtype] * math.prod(shape)
        out[name] = TensorInfo(name=name, dtype=dtype, shape=tuple(shape), start=position, end=position + size)
        position += size
    return out


def quantized_weights(path: str) -> dict:
    """The checkpoint's QuantizedWeights, from its config.json (or a file beside it, ModelOpt's
    hf_quant_config.json) and headers, as the driver will find them."""
    from merge_core.format.codecs import CONFIG_FILES, group_weights, read_scheme
    beside = {}
    for name in CONFIG_FILES:
        if os.path.exists(os.path.join(path, name)):
            with open(os.path.join(path, name)) as f:
                beside[name] = (json.load(f), name)
    return group_weights(read_scheme(read_config(path), "config.json", beside), tensor_infos(path), path)


def decode_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """Every quantized weight decoded by merge_core's codecs (float32), by logical name."""
    from merge_core.format.codecs import decode

    stored = stored_tensors(path)
    return {name: decode(weight, {role: stored[info.name] for role, info in weight.parts})
            for name, weight in quantized_weights(path).items()}


def fuse_experts(per_expert: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert `...experts.{e}.{gate,up,down}_proj.weight` as transformers holds them in memory for
    DeepSeek-V3: `...experts.gate_up_proj` (E, 2I, H), each expert's gate rows then up rows, and
    `...experts.down_proj` (E, H, I)."""
    fused = {}
    for prefix in sorted({n.split(".experts.")[0] for n in per_expert if ".experts." in n}):
        count = len({n for n in per_expert if n.startswith(prefix + ".experts.") and n.endswith("down_proj.weight")})
        weights = [{proj: per_expert[f"{prefix}.experts.{e}.{proj}.weight"] for proj in ("gate_proj", "up_proj",
                                                                                          "down_proj")}
                   for e in range(count)]
        fused[f"{prefix}.experts.gate_up_proj"] = torch.stack([torch.cat([w["gate_proj"], w["up_proj"]])
                                                               for w in weights])
        fused[f"{prefix}.experts.down_proj"] = torch.stack([w["down_proj"] for w in weights])
    return fused
