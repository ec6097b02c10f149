"""Every tensor lora-merge writes equals PEFT's merge_and_unload + save_pretrained, bit for bit."""

from __future__ import annotations

import pytest
import torch

from merge_core.inputs.adapter import load_adapter
from merge_core.io.registry import open_storage
from tests.local_merge import merge_without_ray
from tests.reference import assert_bit_identical, changed_tensors, load_checkpoint, make_adapter, make_base, peft_merged

CASES = {
    "llama-bf16": dict(family="llama", dtype=torch.bfloat16, lora={}),
    "llama-fp16": dict(family="llama", dtype=torch.float16, lora={}),
    "llama-fp32": dict(family="llama", dtype=torch.float32, lora={}),
    "qwen2-bf16": dict(family="qwen2", dtype=torch.bfloat16, lora={}),
    "llama-rslora": dict(family="llama", dtype=torch.bfloat16, lora=dict(r=8, lora_alpha=13, use_rslora=True)),
    "qwen2-fp16-rslora": dict(family="qwen2", dtype=torch.float16, lora=dict(r=4, lora_alpha=7, use_rslora=True)),
    "llama-rank-alpha-patterns": dict(family="llama", dtype=torch.bfloat16, lora=dict(
        r=8, lora_alpha=16, rank_pattern={"q_proj": 4, r"layers\.1\.mlp\.down_proj": 2},
        alpha_pattern={"v_proj": 3, "model.layers.0.mlp.up_proj": 5})),
    "gpt2-fan-in-fan-out": dict(family="gpt2", dtype=torch.bfloat16, lora=dict(
        target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "gpt2-fan-in-fan-out-fp32": dict(family="gpt2", dtype=torch.float32, lora=dict(
        target_modules=["c_attn"], fan_in_fan_out=True, use_rslora=True)),
    "qwen2-lora-bias": dict(family="qwen2", dtype=torch.bfloat16, lora=dict(
        target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True)),
    "qwen2-lora-bias-fp16-rslora": dict(family="qwen2", dtype=torch.float16, lora=dict(
        target_modules=["v_proj"], lora_bias=True, use_rslora=True, r=4, lora_alpha=6)),
    "qwen2-partial-targets": dict(family="qwen2", dtype=torch.bfloat16, lora=dict(
        target_modules=["q_proj", "down_proj"], layers_to_transform=[1])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_merge_equals_peft_bit_for_bit(tmp_path, case):
    spec = CASES[case]
    base = make_base(str(tmp_path / "base"), spec["family"], spec["dtype"])
    adapter = make_adapter(str(tmp_path / "adapter"), spec["family"], **spec["lora"])
    reference = peft_merged(base, adapter, str(tmp_path / "peft"), spec["family"], spec["dtype"])
    ours = merge_without_ray(base, [adapter], str(tmp_path / "ours"))

    assert_bit_identical(ours, reference)
    changed = changed_tensors(load_checkpoint(base), ours)
    adapted = {u.target for u in load_adapter(open_storage(adapter)).updates}
    assert changed and set(changed) <= adapted, "the merge changed exactly the adapted tensors"


def test_partial_targets_leave_other_tensors_byte_identical(tmp_path):
    base = make_base(str(tmp_path / "base"))
    adapter = make_adapter(str(tmp_path / "adapter"), target_modules=["v_proj"])
    ours = merge_without_ray(base, [adapter], str(tmp_path / "ours"))
    assert changed_tensors(load_checkpoint(base), ours) == [
        "model.layers.0.self_attn.v_proj.weight", "model.layers.1.self_attn.v_proj.weight"]


def test_merged_logits_match_unmerged_adapter(tmp_path):
    """The merged checkpoint predicts as base + adapter do unmerged (float32 math, bf16 weights)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = make_base(str(tmp_path / "base"))
    adapter = make_adapter(str(tmp_path / "adapter"), b_std=0.05)
    out = str(tmp_path / "ours")
    merge_without_ray(base, [adapter], out)

    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    unmerged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16), adapter)
    unmerged = unmerged.to(torch.float32).eval()
    merged = LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16).to(torch.float32).eval()
    plain = LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16).to(torch.float32).eval()
    with torch.no_grad():
        expected, got, before = (m(tokens).logits for m in (unmerged, merged, plain))
    assert not torch.allclose(before, expected, atol=1e-3), "the adapter must change the predictions"
    # bf16 weights carry 8 mantissa bits: rounding W+ΔW once moves logits by well under 2%.
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
