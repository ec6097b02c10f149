"""A Llama-shaped bf16 checkpoint of a chosen size, and a PEFT LoRA adapter on every linear layer.

Written tensor by tensor (never the whole model in memory), so a 16 GB checkpoint can be
built on a small machine. The config is a real LlamaConfig, so PEFT and transformers load it.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_shapes(hidden: int, intermediate: int, heads: int, kv_heads: int) -> dict[str, tuple[int, int]]:
    head_dim = hidden // heads
    return {"q_proj": (hidden, hidden), "k_proj": (kv_heads * head_dim, hidden),
            "v_proj": (kv_heads * head_dim, hidden), "o_proj": (hidden, hidden),
            "gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden),
            "down_proj": (hidden, intermediate)}


def layers_for(size_bytes: float, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int) -> int:
    per_layer = 2 * (sum(o * i for o, i in llama_shapes(hidden, intermediate, heads, kv_heads).values()) + 2 * hidden)
    return max(1, round((size_bytes - 2 * 2 * vocab * hidden) / per_layer))


def _module_path(layer: int, module: str) -> str:
    group = "self_attn" if module in LINEAR[:4] else "mlp"
    return f"model.layers.{layer}.{group}.{module}"


def _write_shards(base: str, names: list[tuple[str, tuple[int, ...]]], shard_gb: float,
                  generator: torch.Generator) -> None:
    """Random bf16 tensors of these names and shapes, in shards of about shard_gb, and the index."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in names:
        nbytes = 2 * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > shard_gb * 1e9:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        data = {n: (torch.randn(s, generator=generator) * 0.02).to(torch.bfloat16) for n, s in shard}
        save_file(data, os.path.join(base, file), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in data.values())
        weight_map.update({n: file for n, _ in shard})
        del data
    with open(os.path.join(base, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _built(base: str, adapter: str) -> bool:
    return os.path.exists(os.path.join(base, "model.safetensors.index.json")) and os.path.exists(
        os.path.join(adapter, "adapter_model.safetensors"))


def build(path: str, size_gb: float = 4.5, hidden: int = 4096, intermediate: int = 11008, heads: int = 32,
          kv_heads: int = 8, vocab: int = 32000, shard_gb: float = 1.0, rank: int = 16, seed: int = 0) -> tuple[str, str]:
    """Write base/ and adapter/ under path (kept if already complete); returns their paths."""
    base, adapter = os.path.join(path, "base"), os.path.join(path, "adapter")
    if _built(base, adapter):
        return base, adapter
    from peft import LoraConfig
    from transformers import LlamaConfig

    layers = layers_for(size_gb * 1e9, hidden, intermediate, heads, kv_heads, vocab)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         tie_word_embeddings=False, torch_dtype="bfloat16")
    os.makedirs(base, exist_ok=True)
    config.save_pretrained(base)
    generator = torch.Generator().manual_seed(seed)
    shapes = llama_shapes(hidden, intermediate, heads, kv_heads)

    def tensors():
        yield "model.embed_tokens.weight", (vocab, hidden)
        for layer in range(layers):
            for module in LINEAR:
                yield f"{_module_path(layer, module)}.weight", shapes[module]
            yield f"model.layers.{layer}.input_layernorm.weight", (hidden,)
            yield f"model.layers.{layer}.post_attention_layernorm.weight", (hidden,)
        yield "model.norm.weight", (hidden,)
        yield "lm_head.weight", (vocab, hidden)

    _write_shards(base, list(tensors()), shard_gb, generator)

    os.makedirs(adapter, exist_ok=True)
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LINEAR), task_type="CAUSAL_LM").save_pretrained(adapter)
    lora = {}
    for layer in range(layers):
        for module in LINEAR:
            out_features, in_features = shapes[module]
            prefix = f"base_model.model.{_module_path(layer, module)}"
            lora[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) / in_features ** 0.5
            lora[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
    save_file(lora, os.path.join(adapter, "adapter_model.safetensors"))
    return base, adapter


def more_adapters(adapter: str, count: int, seed: int = 1) -> list[str]:
    """`adapter` and count - 1 others of its config and shapes, with their own random factors (as
    many fine-tunes of one base would be), beside it as adapter-2, adapter-3, ... (kept if there)."""
    from safetensors.torch import load_file

    paths = [adapter] + [f"{adapter}-{number}" for number in range(2, count + 1)]
    first = None
    for number, path in enumerate(paths[1:], 2):
        if os.path.exists(os.path.join(path, "adapter_model.safetensors")):
            continue
        first = first if first is not None else load_file(os.path.join(adapter, "adapter_model.safetensors"))
        generator = torch.Generator().manual_seed(seed * 1000 + number)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(adapter, "adapter_config.json")) as f:
            config = f.read()
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            f.write(config)
        tensors = {name: (torch.randn(t.shape, generator=generator) * float(t.float().std())).to(t.dtype)
                   for name, t in first.items()}
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    return paths


EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def build_moe(path: str, size_gb: float = 4.5, hidden: int = 2048, experts: int = 64, moe_intermediate: int = 768,
              heads: int = 16, kv_heads: int = 4, vocab: int = 32000, shard_gb: float = 1.0, rank: int = 16,
              seed: int = 0) -> tuple[str, str]:
    """A Qwen3-MoE-shaped checkpoint (experts stored one tensor per expert and projection, as
    most MoE families store them) and an adapter with LoRA on the attention projections and on
    the fused expert parameters (target_parameters gate_up_proj and down_proj)."""
    base, adapter = os.path.join(path, "base"), os.path.join(path, "adapter")
    if _built(base, adapter):
        return base, adapter
    from transformers import Qwen3MoeConfig

    head_dim = hidden // heads
    attention = {"q_proj": (heads * head_dim, hidden), "k_proj": (kv_heads * head_dim, hidden),
                 "v_proj": (kv_heads * head_dim, hidden), "o_proj": (hidden, heads * head_dim)}
    expert = {"gate_proj": (moe_intermediate, hidden), "up_proj": (moe_intermediate, hidden),
              "down_proj": (hidden, moe_intermediate)}
    per_layer = 2 * (sum(o * i for o, i in attention.values()) + experts * sum(o * i for o, i in expert.values()))
    layers = max(1, round((size_gb * 1e9 - 2 * 2 * vocab * hidden) / per_layer))
    config = Qwen3MoeConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            num_key_value_heads=kv_heads, head_dim=head_dim, moe_intermediate_size=moe_intermediate,
                            num_experts=experts, num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[],
                            tie_word_embeddings=False, torch_dtype="bfloat16")
    os.makedirs(base, exist_ok=True)
    config.save_pretrained(base)

    def tensors():
        yield "model.embed_tokens.weight", (vocab, hidden)
        for layer in range(layers):
            prefix = f"model.layers.{layer}"
            for module, shape in attention.items():
                yield f"{prefix}.self_attn.{module}.weight", shape
            yield f"{prefix}.self_attn.q_norm.weight", (head_dim,)
            yield f"{prefix}.self_attn.k_norm.weight", (head_dim,)
            yield f"{prefix}.mlp.gate.weight", (experts, hidden)
            for e in range(experts):
                for projection, shape in expert.items():
                    yield f"{prefix}.mlp.experts.{e}.{projection}.weight", shape
            yield f"{prefix}.input_layernorm.weight", (hidden,)
            yield f"{prefix}.post_attention_layernorm.weight", (hidden,)
        yield "model.norm.weight", (hidden,)
        yield "lm_head.weight", (vocab, hidden)

    generator = torch.Generator().manual_seed(seed)
    _write_shards(base, list(tensors()), shard_gb, generator)

    _moe_adapter(adapter, layers, attention, experts, hidden, moe_intermediate, rank, generator)
    return base, adapter


def _moe_adapter(adapter: str, layers: int, attention: dict, experts: int, hidden: int, moe_intermediate: int,
                 rank: int, generator: torch.Generator) -> None:
    """LoRA on the attention projections and, through target_parameters, on the fused experts."""
    from peft import LoraConfig

    os.makedirs(adapter, exist_ok=True)
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(attention), task_type="CAUSAL_LM",
               target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]).save_pretrained(adapter)
    lora = {}
    for layer in range(layers):
        for module, (out_features, in_features) in attention.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            lora[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) / in_features ** 0.5
            lora[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
        # nested ParamWrappers: gate_up_proj (E, 2I, H) innermost, down_proj (E, H, I) outermost
        experts_module = f"base_model.model.model.layers.{layer}.mlp.experts"
        for wrapper, (out_features, in_features) in ((f"{experts_module}.base_layer", (2 * moe_intermediate, hidden)),
                                                     (experts_module, (hidden, moe_intermediate))):
            lora[f"{wrapper}.lora_A.weight"] = (torch.randn(rank * experts, in_features, generator=generator)
                                                / in_features ** 0.5)
            lora[f"{wrapper}.lora_B.weight"] = torch.randn(out_features, rank * experts, generator=generator) * 0.01
    save_file(lora, os.path.join(adapter, "adapter_model.safetensors"))


def quantize_fp8(dense: str, path: str, block: int = 128) -> str:
    """The dense checkpoint's decoder linear weights as FP8 e4m3 with block scales (DeepSeek-V3's
    layout: X.weight beside X.weight_scale_inv, float32), the rest as it is, in shards of the
    dense ones' names; written tensor by tensor with lora-merge's own quantizer. Kept if complete."""
    from safetensors import safe_open

    from merge_core.format.codecs import fp8_block

    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_path):
        return path
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(dense, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    weight_map, total = {}, 0
    for shard in shards:
        out = {}
        with safe_open(os.path.join(dense, shard), "pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if name.endswith("_proj.weight") and ".layers." in name:
                    codes, scale = fp8_block.quantize(tensor.float(), (block, block), torch.float32)
                    out[name], out[f"{name}_scale_inv"] = codes, scale
                else:
                    out[name] = tensor
        save_file(out, os.path.join(path, shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in out})
        total += sum(t.numel() * t.element_size() for t in out.values())
        del out
    with open(os.path.join(dense, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [block, block]}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(index_path, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return path


# --quantized's compressed-tensors choices: the preset each names (what RedHatAI's releases use)
CT_PRESETS = {"fp8-dynamic": ("FP8_DYNAMIC", "float-quantized"), "fp8-block": ("FP8_BLOCK", "float-quantized"),
              "w8a8": ("W8A8", "int-quantized"), "w4a16": ("W4A16", "pack-quantized"),
              "w4a16-asym": ("W4A16_ASYM", "pack-quantized"), "nvfp4": ("NVFP4A16", "nvfp4-pack-quantized"),
              "mxfp4": ("MXFP4A16", "mxfp4-pack-quantized"), "mxfp8": ("MXFP8A16", "mxfp8-quantized")}
QUANTIZED = ("fp8", *CT_PRESETS)


def quantize(dense: str, path: str, kind: str) -> str:
    """The dense checkpoint stored in format `kind` (one of QUANTIZED), in shards of its names. Kept if complete."""
    return quantize_fp8(dense, path) if kind == "fp8" else quantize_ct(dense, path, kind)


def quantize_ct(dense: str, path: str, kind: str) -> str:
    """The dense checkpoint's decoder linears quantized by a compressed-tensors preset, shard by shard, with
    compressed-tensors' own compressors and llm-compressor's fused global scales (tests/ct_models.py)."""
    from safetensors.torch import load_file

    from tests.ct_models import compress_state, ct_schemes, quantization_config

    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_path):
        return path
    os.makedirs(path, exist_ok=True)
    preset, fmt = CT_PRESETS[kind]
    schemes, ignore = ct_schemes({"group_0": (preset, ["re:.*layers.*_proj$"])}, fmt), ["lm_head"]
    with open(os.path.join(dense, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    weight_map, total = {}, 0
    for shard in shards:
        out, _, _ = compress_state(load_file(os.path.join(dense, shard)), schemes, ignore, fmt)
        save_file({n: t.contiguous() for n, t in out.items()}, os.path.join(path, shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in out})
        total += sum(t.numel() * t.element_size() for t in out.values())
        del out
    with open(os.path.join(dense, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = quantization_config(schemes, ignore, fmt)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(index_path, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return path
