"""Builders for PEFT adapter variants beyond plain LoRA, and PEFT's own merge of them as the reference.

Every builder makes a real transformers model, saves it with save_pretrained in several shards, and
makes the adapter the way a user would: get_peft_model on that base (loaded in float32, as for
training), then non-zero trained-looking weights, then PEFT's save_pretrained. The reference is PEFT's
merge_and_unload + save_pretrained on the CPU.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Callable, Sequence

import torch

from tests.reference import TINY, changed_tensors, load_checkpoint

# ---------------------------------------------------------------- models


def llama_seq_cls(num_labels: int = 3):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    return LlamaForSequenceClassification, LlamaConfig(**TINY, num_labels=num_labels, pad_token_id=0)


def resnet():
    """1x1 and 3x3 bottleneck convs, a 1x1 shortcut and a 7x7 stride-2 stem; no conv biases."""
    from transformers import ResNetConfig, ResNetForImageClassification
    return ResNetForImageClassification, ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[16, 32],
                                                      depths=[1, 1], layer_type="bottleneck", num_labels=3)


def gpt_oss():
    """MoE whose experts are 3-D parameters saved as such: gate_up_proj (E, H, 2I), down_proj (E, I, H)."""
    from transformers import GptOssConfig, GptOssForCausalLM
    return GptOssForCausalLM, GptOssConfig(**(TINY | dict(intermediate_size=32, head_dim=16)), num_local_experts=4,
                                           num_experts_per_tok=2,
                                           layer_types=["sliding_attention", "full_attention"])


def mixtral():
    """MoE whose experts are fused 3-D parameters in memory (gate_up_proj (E, 2I, H), down_proj (E, H, I))
    but saved by save_pretrained as per-expert 2-D w1/w3/w2 tensors."""
    from transformers import MixtralConfig, MixtralForCausalLM
    return MixtralForCausalLM, MixtralConfig(**(TINY | dict(intermediate_size=32)), num_local_experts=4,
                                             num_experts_per_tok=2)


def qwen3_moe():
    """MoE whose checkpoint stores each expert's gate_proj/up_proj/down_proj (the layout most MoE
    families share), fused in memory into gate_up_proj (E, 2I, H) and down_proj (E, H, I)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    return Qwen3MoeForCausalLM, Qwen3MoeConfig(**(TINY | dict(head_dim=16)), moe_intermediate_size=24, num_experts=4,
                                               num_experts_per_tok=2, decoder_sparse_step=1)


def causal_lm(family: str = "llama", **sizes):
    from tests.reference import model_class
    config_cls, model_cls = model_class(family)
    return model_cls, config_cls(**(TINY | sizes))


def save_base(spec, path: str, dtype: torch.dtype = torch.bfloat16, max_shard_size: str = "60KB",
              seed: int = 0) -> str:
    """A model with random weights, saved by save_pretrained in several shards."""
    model_cls, config = spec
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_cls(config).to(dtype).save_pretrained(path, max_shard_size=max_shard_size)
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1, "the base must be sharded"
    return path


# ---------------------------------------------------------------- adapters


def randomize_adapter(peft_model, seed: int = 1, b_std: float = 0.2) -> None:
    """Give every trainable adapter tensor a value that makes the merge change the weights: PEFT
    initialises lora_B, lora_embedding_A, hada_w2_b and lokr_w1 to zero, the DoRA magnitude to the
    weight norm and ia3_l to ones, any of which would make the merge a no-op or hide a wrong formula."""
    generator = torch.Generator().manual_seed(seed)

    def noise(p: torch.Tensor) -> torch.Tensor:
        return torch.randn(p.shape, generator=generator).to(p.dtype)

    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if not param.requires_grad:
                continue
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * noise(param))
            elif "ia3_l" in name:
                param.copy_(1 + 0.3 * noise(param))
            elif "hada_" in name or "lokr_" in name:
                param.copy_(0.3 * noise(param))
            elif "lora_B" in name or "lora_embedding_A" in name:
                param.copy_(b_std * noise(param))
            elif "modules_to_save" in name:
                param.add_(0.1 * noise(param))


def build_adapter(spec, base: str, path: str, peft_config, seed: int = 1, resize: int | None = None,
                  prepare: Callable | None = None) -> str:
    """get_peft_model on the base loaded in float32 (so base_model_name_or_path is the base, as after
    training), optionally after resize_token_embeddings, then trained-looking weights, then save."""
    from peft import get_peft_model

    model_cls, _ = spec
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_cls.from_pretrained(base, dtype=torch.float32)
        if resize is not None:
            model.resize_token_embeddings(resize, mean_resizing=False)
        if prepare is not None:
            prepare(model)
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, peft_config)
        randomize_adapter(peft_model, seed)
        peft_model.save_pretrained(path)
    return path


def peft_reference(spec, base: str, adapters: Sequence[str], out: str, dtype: torch.dtype = torch.bfloat16,
                   resize: int | None = None) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload + save_pretrained on the CPU: the bits lora-merge must reproduce. Several
    adapters are loaded with load_adapter and merged with merge_and_unload(adapter_names=[...]) in order.
    A resized vocabulary needs the base resized first, as PEFT requires (the new rows are then
    overwritten by the adapter's saved copies)."""
    from peft import PeftModel

    model_cls, _ = spec
    names = [f"adapter{i}" for i in range(len(adapters))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_cls.from_pretrained(base, dtype=dtype)
        if resize is not None:
            model.resize_token_embeddings(resize, mean_resizing=False)
        peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
        for name, adapter in zip(names[1:], adapters[1:]):
            peft_model.load_adapter(adapter, adapter_name=name)
        merged = peft_model.merge_and_unload(adapter_names=names if len(names) > 1 else None)
        merged.save_pretrained(out)
    return load_checkpoint(out)


def adapter_keys(adapter: str) -> list[str]:
    from safetensors import safe_open
    with safe_open(os.path.join(adapter, "adapter_model.safetensors"), "pt") as f:
        return sorted(f.keys())


def read_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------- comparisons


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of the (shared) float dtype lie between a and b, elementwise;
    0 for identical bits, 1 for neighbours (+0 and -0 count as equal)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    magnitude = (1 << (8 * a.element_size() - 1)) - 1

    def ordered(x: torch.Tensor) -> torch.Tensor:  # monotonic map of float bit patterns onto integers
        bits = x.contiguous().view(int_dtype).to(torch.int64)
        return torch.where(bits < 0, -(bits & magnitude), bits)

    return (ordered(a) - ordered(b)).abs()


def assert_within_ulps(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], max_ulps: int = 1) -> float:
    """Same tensors, dtypes and shapes as the reference, every element within max_ulps of it.
    Returns the fraction of elements that are bit-identical."""
    assert set(ours) == set(reference), set(ours) ^ set(reference)
    wrong_kind = [k for k in reference if ours[k].dtype != reference[k].dtype or ours[k].shape != reference[k].shape]
    assert not wrong_kind, f"dtype/shape differ from PEFT's merge for {wrong_kind[:3]}"
    total = identical = 0
    worst: list[tuple[int, str]] = []
    for key in sorted(reference):
        distance = ulp_distance(ours[key], reference[key])
        total += distance.numel()
        identical += int((distance == 0).sum())
        if distance.numel() and int(distance.max()) > max_ulps:
            worst.append((int(distance.max()), key))
    fraction = identical / max(total, 1)
    assert not worst, (f"{len(worst)} tensors differ from PEFT's merge by more than {max_ulps} ulp, e.g. "
                       f"{sorted(worst, reverse=True)[:3]} ({fraction:.4%} of elements bit-identical)")
    return fraction


# ---------------------------------------------------------------- test helpers

BF16, FP16 = torch.bfloat16, torch.float16
ATTN = ["q_proj", "v_proj"]


def merge_both(tmp_path, spec, base, adapters, dtype, resize=None):
    """PEFT's merged checkpoint (the reference) and the base checkpoint."""
    reference = peft_reference(spec, base, adapters, str(tmp_path / "peft"), dtype, resize=resize)
    return reference, load_checkpoint(base)


def assert_changes(base_ckpt, reference, expected):
    """The builders made adapters that change what they target, and PEFT merged them."""
    changed = set(changed_tensors(base_ckpt, reference))
    assert set(expected) <= changed, f"PEFT's merge left {sorted(set(expected) - changed)[:3]} unchanged"


def layer_tensors(*names, layers=(0, 1)):
    return [f"model.layers.{i}.{n}" for i in layers for n in names]
