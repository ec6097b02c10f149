"""Real models and adapters built with transformers and PEFT, and PEFT's own merge as the reference."""

from __future__ import annotations

import glob
import os

import torch
from safetensors.torch import load_file

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)

# Large enough (about 27 MB in bf16) that shards upload in several 5 MiB parts.
MEDIUM = dict(hidden_size=512, intermediate_size=1024, vocab_size=8192)


def model_class(family: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    return {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "gpt2": (GPT2Config, GPT2LMHeadModel)}[family]


def make_base(path: str, family: str = "llama", dtype: torch.dtype = torch.bfloat16,
              max_shard_size: str = "60KB", seed: int = 0, **sizes) -> str:
    """A real causal LM, random weights, saved by save_pretrained in several shards."""
    config_cls, model_cls = model_class(family)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**(TINY | sizes))).to(dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


def make_adapter(path: str, family: str = "llama", seed: int = 1, b_std: float = 0.2, sizes: dict | None = None,
                 **lora) -> str:
    """A PEFT LoRA adapter made by get_peft_model, with non-zero lora_B so the merge changes weights."""
    from peft import LoraConfig, get_peft_model

    config_cls, model_cls = model_class(family)
    torch.manual_seed(seed)
    lora.setdefault("r", 8)
    lora.setdefault("lora_alpha", 16)
    lora.setdefault("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model_cls(config_cls(**(TINY | (sizes or {})))), LoraConfig(**lora))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=b_std)
    peft_model.save_pretrained(path)
    return path


def load_checkpoint(path: str) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        tensors.update(load_file(file))
    return tensors


def peft_merged(base: str, adapter: str, out: str, family: str = "llama",
                dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload + save_pretrained on the CPU: the bits we must reproduce."""
    from peft import PeftModel

    _, model_cls = model_class(family)
    model = model_cls.from_pretrained(base, dtype=dtype)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)
    return load_checkpoint(out)


def assert_bit_identical(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(reference), set(ours) ^ set(reference)
    differing = [k for k in reference
                 if ours[k].dtype != reference[k].dtype or ours[k].shape != reference[k].shape
                 or not torch.equal(ours[k].reshape(-1).view(torch.uint8), reference[k].reshape(-1).view(torch.uint8))]
    assert not differing, f"{len(differing)} tensors differ from PEFT's merge, e.g. {differing[:3]}"


def changed_tensors(base: dict[str, torch.Tensor], merged: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k for k in base if not torch.equal(base[k], merged[k]))

