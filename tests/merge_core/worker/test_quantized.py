"""Merges into quantized bases (FP8 block-scaled, MXFP4 experts, INT4 pack-quantized), kept in the base's
format or written as bf16 (--dequantize), against references that are not the code under test.

The reference merge is PEFT's own merge_and_unload, in float32, into a model whose quantized weights hold
their exact dequantized values (transformers' MXFP4 dequantization, compressed-tensors' INT4, a float64
FP8 one): W' there has the bits lora-merge's float32 fuse gives. It is then requantized by the formats'
references in tests/quantized_models.py (DeepSeek's block quantizer in float64, a nearest-e2m1 search,
compressed-tensors' own quantizer).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.local_merge import merge_without_ray
from tests.quantized_merges import merged_in_format, reference_case
from tests.quantized_models import (
    e2m1_nearest,
    fp8_reference_quantize,
    int4_args,
    int4_reference_quantize,
    mxfp4_reference_quantize,
    quantized_weights,
    read_config,
    save_fp8_deepseek_v3,
    save_fp8_llama,
    save_int4_kimi_style,
    save_mxfp4_gpt_oss,
)
from tests.reference import load_checkpoint

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama():
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM, None


def deepseek():
    from transformers import DeepseekV3ForCausalLM
    return DeepseekV3ForCausalLM, None


def gpt_oss():
    from transformers import GptOssForCausalLM
    return GptOssForCausalLM, None


def lora(**extra):
    from peft import LoraConfig
    return LoraConfig(r=4, lora_alpha=8, **extra)


# name: (builder, model, LoRA config)
CASES = {
    "fp8-llama-partial-blocks": (save_fp8_llama, llama, lambda: lora(target_modules=LLAMA_LINEARS)),
    "fp8-llama-ue8m0-bf16-scales": (lambda p: save_fp8_llama(p, scale_fmt="ue8m0", scale_dtype=torch.bfloat16),
                                    llama, lambda: lora(target_modules=["q_proj", "down_proj"])),
    "fp8-deepseek-v3-moe": (save_fp8_deepseek_v3, deepseek, lambda: lora(
        target_modules=["q_b_proj", "kv_b_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])),
    "mxfp4-gpt-oss": (save_mxfp4_gpt_oss, gpt_oss, lambda: lora(
        target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])),
    "int4-kimi-style": (save_int4_kimi_style, deepseek, lambda: lora(
        target_modules=["q_b_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])),
}


def requantize(weight, merged: torch.Tensor) -> dict[str, torch.Tensor]:
    """The format's reference quantizer on W', by role: fresh scales."""
    if weight.codec == "fp8_block":
        codes, scale = fp8_reference_quantize(merged, weight.block, torch.float32 if weight.part("scale").dtype
                                              == "F32" else torch.bfloat16, weight.scale_fmt == "ue8m0")
        return {"codes": codes, "scale": scale}
    if weight.codec == "mxfp4":
        blocks, scales = mxfp4_reference_quantize(merged, ties="away")
        return {"blocks": blocks, "scales": scales}
    packed, scale = int4_reference_quantize(merged, weight.args.group_size, torch.bfloat16)
    return {"codes": packed, "scale": scale, "shape": torch.tensor(weight.shape, dtype=torch.int32)}


def requantize_kept(weight, merged: torch.Tensor, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The format's reference rounding of W' against the base's own scales (--scales keep), by role."""
    if weight.codec == "fp8_block":
        bo, bi = weight.block
        spread = base["scale"].double().repeat_interleave(bo, 0).repeat_interleave(bi, 1)[:merged.shape[0],
                                                                                          :merged.shape[1]]
        return {"codes": (merged.double() / spread).clamp(-448, 448).to(torch.float8_e4m3fn), "scale": base["scale"]}
    if weight.codec == "mxfp4":
        x = merged.transpose(1, 2).double()
        groups = x.reshape(*x.shape[:2], -1, 32) * torch.exp2(127.0 - base["scales"].double()).unsqueeze(-1)
        codes = e2m1_nearest(groups, ties="away").to(torch.int64)
        return {"blocks": (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8), "scales": base["scales"]}
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization.lifecycle.forward import quantize
    codes = quantize(x=merged.float(), scale=base["scale"], zero_point=None, args=int4_args(weight.args.group_size),
                     dtype=torch.int8)
    return {"codes": pack_to_int32(codes, 4), "scale": base["scale"], "shape": base["shape"]}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    build, model, config = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    checkpoint = build(str(root / "base"))
    adapter, reference = reference_case(checkpoint, model()[0], config(), root)
    return request.param, checkpoint, adapter, reference, root


@pytest.mark.parametrize("scales", ["fresh", "keep"])
def test_each_format_merges_in_its_own_format_as_the_references_requantize(case, scales):
    name, checkpoint, adapter, reference, root = case
    base, merged = merged_in_format(checkpoint, adapter, str(root / f"out-{scales}"), scales=scales)
    weights = quantized_weights(checkpoint.path)
    touched = [w for n, w in weights.items() if not torch.equal(reference[n], checkpoint.exact[n])]
    assert touched, "the adapter updates quantized weights"
    for weight in weights.values():
        if weight not in touched:  # codes and scales byte for byte
            assert all(torch.equal(merged[i.name].view(torch.uint8), base[i.name].view(torch.uint8))
                       for _, i in weight.parts), weight.name
            continue
        stored = {role: base[info.name] for role, info in weight.parts}
        expected = (requantize(weight, reference[weight.name]) if scales == "fresh"
                    else requantize_kept(weight, reference[weight.name], stored))
        for role, info in weight.parts:
            ours, theirs = merged[info.name], expected[role]
            if role == "codes" and weight.codec == "fp8_block":
                # the float64 references may round a tie the float32 division decides the other way: one step
                steps = (ours.view(torch.uint8).to(torch.int16) - theirs.view(torch.uint8).to(torch.int16)).abs()
                assert int(steps.max()) <= 1 and float((steps > 0).float().mean()) < 1e-3, (weight.name, role)
            else:
                assert torch.equal(ours.view(torch.uint8), theirs.contiguous().view(torch.uint8)), (weight.name, role)


def test_dequantize_writes_the_merge_as_bf16_rounded_once(case):
    name, checkpoint, adapter, reference, root = case
    out = str(root / "out-bf16")
    merge_without_ray(checkpoint.path, [adapter], out, dequantize=True)
    merged = load_checkpoint(out)
    assert "quantization_config" not in read_config(out)
    weights = quantized_weights(checkpoint.path)
    stored_parts = {i.name for w in weights.values() for _, i in w.parts} - set(weights)
    assert not stored_parts & set(merged), "no scales or packed codes left"
    for logical in weights:
        assert merged[logical].dtype == torch.bfloat16
        assert torch.equal(merged[logical], reference[logical].to(torch.bfloat16)), logical
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(index["weight_map"]) == set(merged)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())


def test_the_spot_check_finds_a_requantized_weight_that_is_not_the_merge(case, tmp_path):
    """The final task's float64 check decodes a quantized weight's stored parts: codes left as the base's
    (the update lost) lie more than one step of the format from the merge."""
    from safetensors.torch import load_file, save_file

    from merge_core.inputs.adapter import load_adapter
    from merge_core.inputs.checkpoint import load_base, read_shard_header
    from merge_core.io.registry import open_storage
    from merge_core.planning.planner import plan_merge
    from merge_core.publish.spot_check import _Sources, _spot_quantized
    from merge_core.worker.job import MergeJob
    from merge_core.worker.shard_merge import merge_shard

    name, checkpoint, adapter, reference, root = case
    plan = plan_merge(load_base(open_storage(checkpoint.path)), [load_adapter(open_storage(adapter))], [1.0])
    out = str(tmp_path / "out")
    for task in plan.tasks:
        merge_shard(task, MergeJob.of(plan, out))
    two_d = [(t, f) for t in plan.tasks for f in t.targets
             if f.quantized is not None and f.updates and len(f.quantized.shape) == 2]
    if name.startswith("mxfp4"):  # GPT-OSS's experts are 3-D: the row check leaves them to `verify`
        assert not two_d
        return
    task, target = two_d[0]
    rows = [0, target.quantized.shape[0] - 1]
    storages = (open_storage(checkpoint.path), [open_storage(adapter)], open_storage(out))
    sources = _Sources(*storages, read_shard_header(open_storage(out), task.name))
    assert _spot_quantized(task, target, rows, sources) == []
    codes = target.parts[0].info.name
    stored = load_file(f"{out}/{task.name}")
    stored[codes] = load_file(f"{checkpoint.path}/{target.parts[0].shard}")[codes]
    save_file(stored, f"{out}/{task.name}", metadata={"format": "pt"})
    problems = _spot_quantized(task, target, rows, _Sources(*storages, read_shard_header(open_storage(out), task.name)))
    assert problems and f"tensor {target.tensor} row 0" in problems[0] and "step" in problems[0]
