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


def build(path: str, size_gb: float = 4.5, hidden: int = 4096, intermediate: int = 11008, heads: int = 32,
          kv_heads: int = 8, vocab: int = 32000, shard_gb: float = 1.0, rank: int = 16, seed: int = 0) -> tuple[str, str]:
    """Write base/ and adapter/ under path (kept if already complete); returns their paths."""
    base, adapter = os.path.join(path, "base"), os.path.join(path, "adapter")
    if os.path.exists(os.path.join(base, "model.safetensors.index.json")) and os.path.exists(
            os.path.join(adapter, "adapter_model.safetensors")):
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

    names = list(tensors())
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
