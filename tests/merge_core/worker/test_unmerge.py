"""Unmerge: lora-merge takes adapters back out of a merged model bit for bit as PEFT 0.21's
unmerge_adapter() does, on a merged checkpoint loaded afresh (PeftModel.from_pretrained on it, every
tuner layer marked merged, unmerge_adapter(), unload(), save_pretrained).

PEFT's arithmetic is not the mirror of its merge: LoRA rounds ΔW to the weight's dtype before it
subtracts, adapters come out last first with a rounding after each, and IA3 divides by l + 1e-8. What
PEFT cannot undo (DoRA, whole copies) is refused by name.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from merge_core.errors import InputError
from tests.local_merge import merge_without_ray
from tests.reference import assert_bit_identical, load_checkpoint
from tests.variant_reference import BF16, FP16, build_adapter, causal_lm, gpt_oss, peft_reference, save_base


def peft_unmerged(spec, merged: str, adapters: list[str], out: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT's own unmerge of the adapters from a merged checkpoint, as a user would run it."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    model_cls, _ = spec
    names = [f"adapter{i}" for i in range(len(adapters))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(model_cls.from_pretrained(merged, dtype=dtype), adapters[0],
                                          adapter_name=names[0])
        for name, adapter in zip(names[1:], adapters[1:]):
            model.load_adapter(adapter, adapter_name=name)
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.merged_adapters = list(names)  # a list of its own: unmerge pops it, last first
        model.unmerge_adapter()
        model.unload().save_pretrained(out)
    return load_checkpoint(out)


def nonzero_biases(model) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(std=0.1)


def lora(**extra):
    from peft import LoraConfig
    return LoraConfig(r=4, lora_alpha=8, **extra)


def ia3(**extra):
    from peft import IA3Config
    return IA3Config(**extra)


def loha(**extra):
    from peft import LoHaConfig
    return LoHaConfig(r=4, alpha=8, **extra)


def lokr(**extra):
    from peft import LoKrConfig
    return LoKrConfig(r=4, alpha=8, **extra)


LINEARS = ["q_proj", "v_proj", "o_proj", "down_proj"]
CASES = {
    "llama-bf16": (causal_lm(), BF16, [lambda: lora(target_modules=LINEARS)]),
    "llama-fp16-three-adapters": (causal_lm(), FP16, [lambda: lora(target_modules=LINEARS),
                                                      lambda: lora(target_modules=["q_proj", "up_proj"]),
                                                      lambda: lora(target_modules=["q_proj", "down_proj"])]),
    "gpt2-fan-in-fan-out-lora-bias": (causal_lm("gpt2"), BF16, [lambda: lora(
        target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_bias=True)]),
    "gpt2-ia3-with-biases": (causal_lm("gpt2"), BF16, [lambda: ia3(
        target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True)]),
    "llama-loha-two-adapters": (causal_lm(), BF16, [lambda: loha(target_modules=["q_proj", "v_proj"]),
                                                    lambda: loha(target_modules=["q_proj", "down_proj"])]),
    "llama-lokr": (causal_lm(), BF16, [lambda: lokr(target_modules=["q_proj", "down_proj"])]),
    "gpt-oss-experts": (gpt_oss(), BF16, [lambda: lora(target_modules=["q_proj"], target_parameters=[
        "mlp.experts.gate_up_proj", "mlp.experts.down_proj"])]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_unmerge_is_peft_unmerge_adapter_bit_for_bit(tmp_path, case):
    spec, dtype, configs = CASES[case]
    base = save_base(spec, str(tmp_path / "base"), dtype)
    if "biases" in case:  # transformers starts biases at zero, which would hide the division of the bias
        base_model = spec[0].from_pretrained(base, dtype=dtype)
        nonzero_biases(base_model)
        base_model.save_pretrained(base, max_shard_size="60KB")
    adapters = [build_adapter(spec, base, str(tmp_path / f"adapter{i}"), config(), seed=i + 1)
                for i, config in enumerate(configs)]
    merged_dir = str(tmp_path / "merged")
    peft_reference(spec, base, adapters, merged_dir, dtype)
    reference = peft_unmerged(spec, merged_dir, adapters, str(tmp_path / "peft-unmerged"), dtype)
    ours = merge_without_ray(merged_dir, adapters, str(tmp_path / "ours"), unmerge=True)
    assert_bit_identical(ours, reference)
    merged, original = load_checkpoint(merged_dir), load_checkpoint(base)
    assert any(not torch.equal(merged[k], ours[k]) for k in ours), "the unmerge changed the merged weights"
    recovered = sum(int((ours[k] == original[k]).sum()) for k in ours) / sum(t.numel() for t in ours.values())
    assert recovered < 1, "a merge in bf16 cannot be undone exactly: some bits were lost"


@pytest.mark.parametrize("config, message", [
    (lambda: lora(target_modules=["q_proj"], use_dora=True), "DoRA's merge normalised by the norm of the weight"),
    (lambda: lora(target_modules=["q_proj"], modules_to_save=["lm_head"]), "the adapter's copy replaced the tensor"),
])
def test_what_peft_cannot_unmerge_is_refused_by_name(tmp_path, config, message):
    spec = causal_lm()
    base = save_base(spec, str(tmp_path / "base"), BF16)
    adapter = build_adapter(spec, base, str(tmp_path / "adapter"), config())
    with pytest.raises(InputError, match=message) as error:
        merge_without_ray(base, [adapter], str(tmp_path / "ours"), unmerge=True)
    assert error.value.fix == "give the original base with --base to restore it from there"


def test_with_the_original_base_what_peft_cannot_unmerge_is_restored_from_it(tmp_path):
    """DoRA and whole copies come back bit for bit from the original base; the rest as PEFT unmerges it."""
    spec = causal_lm()
    base = save_base(spec, str(tmp_path / "base"), BF16)
    dora = build_adapter(spec, base, str(tmp_path / "dora"), lora(target_modules=["q_proj"], use_dora=True,
                                                                   modules_to_save=["lm_head"]))
    plain = build_adapter(spec, base, str(tmp_path / "plain"), lora(target_modules=["q_proj", "v_proj"]), seed=2)
    merged_dir = str(tmp_path / "merged")
    peft_reference(spec, base, [dora, plain], merged_dir, BF16)
    ours = merge_without_ray(merged_dir, [dora, plain], str(tmp_path / "ours"), unmerge=True, original=base)
    original, merged = load_checkpoint(base), load_checkpoint(merged_dir)
    restored = ["lm_head.weight", *[f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1)]]
    for name in restored:
        assert not torch.equal(merged[name], original[name]) and torch.equal(ours[name], original[name]), name
    v_proj = "model.layers.0.self_attn.v_proj.weight"  # only the plain adapter's: PEFT's W − round(ΔW)
    assert not torch.equal(ours[v_proj], merged[v_proj])
