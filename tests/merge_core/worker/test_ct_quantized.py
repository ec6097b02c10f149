"""Merges into compressed-tensors checkpoints of every format compressed-tensors 0.20 writes, built with
the library itself from its presets (tests/ct_models.py), against the library's own quantize and compress
of PEFT's float32 merge: `--scales fresh` bit for bit with qparams from a min/max observation (fused
siblings sharing one tensor-level scale as llm-compressor gives them one), `--scales keep` bit for bit
with the base's own qparams; `--dequantize` equal to PEFT's float32 merge rounded to bf16.

The reference merge is PEFT's merge_and_unload in float32 into a model whose quantized weights hold the
float32 values compressed-tensors decompresses them to.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.ct_models import CtCheckpoint, expected_parts, random_model, save_ct, save_ct_state, save_preset
from tests.local_merge import merge_without_ray
from tests.quantized_merges import (
    LORA_ON,
    dequantized_as_peft,
    llama_cls,
    lora,
    reference_case,
    requantized_as_expected,
    spot_check_finds_the_base_codes,
)
from tests.quantized_models import saved_state

PRESETS = ["FP8", "FP8_DYNAMIC", "FP8_BLOCK", "W8A8", "W4A16", "W4A16_ASYM", "NVFP4A16", "MXFP4A16", "MXFP8A16"]


def mixtral_cls():
    from transformers import MixtralForCausalLM
    return MixtralForCausalLM


def mixed(path: str) -> CtCheckpoint:
    """Attention int8 per channel (W8A8), the MLP NVFP4, quantization_config in text_config (Kimi K3's place)."""
    from tests.ct_models import llama
    return save_ct(path, llama(), {"group_0": ("W8A8", ["re:.*self_attn.*"]), "group_1": ("NVFP4A16", ["re:.*mlp.*"])},
                   ["lm_head"], text_config=True)


def moe_experts(path: str) -> CtCheckpoint:
    """A Mixtral whose routed experts alone are NVFP4 (w1/w3 of each expert sharing a global scale)."""
    from transformers import MixtralConfig
    config = MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    tensors, saved = saved_state(random_model(mixtral_cls(), config))
    return save_ct_state(path, tensors, saved, {"group_0": ("NVFP4A16", ["re:.*experts.*"])}, ["lm_head"],
                         "nvfp4-pack-quantized")


# name: (builder, model class, LoRA config)
CASES = {preset: (lambda p, preset=preset: save_preset(p, preset, fused=True), llama_cls,
                  lambda: lora(target_modules=LORA_ON)) for preset in PRESETS}
# what the presets leave out: 8-bit packing per channel with zero points, and NVFP4's activations' global scale
CASES["W8A16-channel-asym"] = (lambda p: save_preset(p, "W8A16", weights=dict(
    strategy="channel", group_size=None, symmetric=False)), llama_cls, lambda: lora(target_modules=LORA_ON))
CASES["NVFP4"] = (lambda p: save_preset(p, "NVFP4"), llama_cls, lambda: lora(target_modules=LORA_ON))
CASES["mixed-precision"] = (mixed, llama_cls, lambda: lora(target_modules=LORA_ON))
CASES["moe-nvfp4-experts"] = (moe_experts, mixtral_cls, lambda: lora(
    target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj"]))


_BUILT: dict[str, tuple] = {}


def built(name: str, tmp_path_factory) -> tuple:
    """(name, checkpoint, adapter, PEFT's float32 merge, folder) of a case, made once for the module."""
    if name not in _BUILT:
        build, model_cls, config = CASES[name]
        root = tmp_path_factory.mktemp(name)
        checkpoint = build(str(root / "base"))
        adapter, reference = reference_case(checkpoint, model_cls(), config(), root)
        _BUILT[name] = (name, checkpoint, adapter, reference, root)
    return _BUILT[name]


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    return built(request.param, tmp_path_factory)


@pytest.mark.parametrize("scales", ["fresh", "keep"])
def test_each_format_is_what_compressed_tensors_makes_of_the_peft_merge(case, scales):
    name, checkpoint, adapter, reference, root = case
    requantization = requantized_as_expected(checkpoint, adapter, reference, str(root / f"out-{scales}"), scales,
                                             expected_parts, checkpoint.schemes)
    ties = requantization["tied"]
    if scales == "fresh" and name in ("FP8", "NVFP4A16", "NVFP4", "moe-nvfp4-experts", "mixed-precision"):  # shared
        assert ties and all(len(group) > 1 for group in ties), ties
    else:
        assert ties == []


def test_dequantize_writes_the_peft_merge_rounded_to_bf16(case):
    name, checkpoint, adapter, reference, root = case
    dequantized_as_peft(checkpoint, adapter, reference, str(root / "out-bf16"))


# How close the merged model's change of the logits comes to PEFT's base + adapter: cosine above, error (of
# the logits, relative to the adapter's change of them) below. This adapter is large (‖ΔW‖ about twice ‖W‖):
# kept scales saturate much of it (measured: cosine 0.82-0.98, error 0.19-0.61), fresh ones do not
# (0.988-0.9999, 0.01-0.16).
LOGITS_AGREE = {"fresh": (0.98, 0.2), "keep": (0.8, 0.65)}


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


@pytest.mark.parametrize("scales", ["keep", "fresh"])
@pytest.mark.parametrize("name", ["FP8_BLOCK", "W8A8", "W4A16_ASYM", "NVFP4A16", "MXFP4A16", "MXFP8A16"])
def test_the_merged_checkpoint_loads_in_transformers_and_predicts_as_base_and_adapter(name, scales,
                                                                                    tmp_path_factory):
    """compressed-tensors decompresses the merged model on load (a format per codec); what the adapter
    changes in its logits is what PEFT's base + adapter change, up to the format's rounding."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    name, checkpoint, adapter, reference, root = built(name, tmp_path_factory)
    out = root / f"out-{scales}"
    if not out.exists():
        merge_without_ray(checkpoint.path, [adapter], str(out), scales=scales)
    tokens = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, quantization_config=(
            CompressedTensorsConfig(run_compressed=False)))
        base = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=torch.float32, quantization_config=(
            CompressedTensorsConfig(run_compressed=False)))
        exact = llama_cls().from_pretrained(str(root / "exact"), dtype=torch.float32)
        with_adapter = PeftModel.from_pretrained(exact, adapter)
        before, after = logits(base, tokens), logits(with_adapter, tokens)
        ours = logits(loaded, tokens)
    change, wanted = (ours - before).flatten(), (after - before).flatten()
    cosine, error = LOGITS_AGREE[scales]
    assert float(torch.nn.functional.cosine_similarity(change, wanted, dim=0)) > cosine, name
    assert float((ours - after).norm() / (after - before).norm()) < error, name
    agree = float((ours.argmax(-1) == after.argmax(-1)).float().mean())
    assert agree > float((before.argmax(-1) == after.argmax(-1)).float().mean()) + 0.3, name


def test_verify_allows_a_gpu_merge_one_step_and_no_more(tmp_path_factory, tmp_path):
    """A shard fused on a GPU may round a code of a quantized weight the other way: verify accepts one step
    of the format there (and nothing on a CPU), and names the weight beyond it."""
    from merge_core.inputs.adapter import load_adapter
    from merge_core.inputs.checkpoint import load_base, read_shard_header
    from merge_core.io.registry import open_storage
    from merge_core.planning.planner import plan_merge
    from merge_core.publish.verify import verify_shard
    from merge_core.worker.job import MergeJob
    from merge_core.worker.shard_merge import merge_shard

    name, checkpoint, adapter, reference, root = built("W4A16_ASYM", tmp_path_factory)
    plan = plan_merge(load_base(open_storage(checkpoint.path)), [load_adapter(open_storage(adapter))], [1.0])
    job = MergeJob.of(plan, str(tmp_path))
    task = next(t for t in plan.tasks if any(f.quantized is not None and f.updates for f in t.targets))
    merge_shard(task, job)
    target = next(f for f in task.targets if f.quantized is not None and f.updates)
    path = tmp_path / task.name
    written = path.read_bytes()
    header = read_shard_header(open_storage(str(tmp_path)), task.name)
    at = header.data_start + header.tensor(target.parts[0].info.name).start  # the first word of the codes
    word = int.from_bytes(written[at:at + 4], "little")
    for change, on_gpu, found in ((1, 1, False), (1, 0, True), (3, 1, True)):
        nibble = word & 0xF  # the row's first code, offset by 8 (bytes patched in place: the file's order stays)
        moved = nibble - change if nibble >= change else nibble + change
        path.write_bytes(written[:at] + ((word & ~0xF) | moved).to_bytes(4, "little") + written[at + 4:])
        problems = verify_shard(task, job, None, None, on_gpu).problems
        assert bool(problems) == found, (change, on_gpu, problems)
        if found and on_gpu:
            assert f"tensor {target.tensor}: 1 elements lie more than one ct_packed step" in problems[0]


def test_the_spot_check_finds_a_requantized_weight_that_is_not_the_merge(case, tmp_path):
    """The final task's float64 check decodes each format's stored parts: codes left as the base's (the
    update lost) lie more than one step of the format from the merge."""
    name, checkpoint, adapter, reference, root = case
    spot_check_finds_the_base_codes(checkpoint, adapter, str(tmp_path))
