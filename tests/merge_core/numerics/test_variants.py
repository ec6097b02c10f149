"""PEFT variants beyond plain LoRA on Linear layers: lora-merge must write what PEFT's merge_and_unload +
save_pretrained writes, bit for bit (DoRA and several adapters: within 1 ulp).

Each test builds a tiny real model saved in several shards, an adapter made by get_peft_model with
non-zero trained-looking weights, PEFT's merged reference (checked to differ from the base in the
targeted tensors, so a builder that produced a no-op adapter fails here rather than passing vacuously),
then runs the worker and final-task code without Ray. The math each variant needs is PEFT's own
(peft/tuners/lora/layer.py, variants.py, ia3/, loha/, lokr/): see the PEFT merge spec that came with these tests.

Variants with a module of their own have their tests beside it: test_vocabulary.py (embeddings, heads,
resized vocabularies, tied embeddings) and test_experts.py (target_parameters).

Until lora-merge implements a variant, its test fails because load_adapter refuses the adapter with an
InputError (or, for several plain LoRA adapters, because the result differs from PEFT's).
"""

from __future__ import annotations

import glob

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_core.errors import InputError
from tests.local_merge import merge_without_ray
from tests.reference import assert_bit_identical, changed_tensors, load_checkpoint, make_base
from tests.variant_reference import (
    BF16,
    FP16,
    adapter_keys,
    assert_changes,
    assert_within_ulps,
    build_adapter,
    causal_lm,
    layer_tensors,
    merge_both,
    resnet,
    save_base,
)

# Embeddings, heads and whole-module copies: test_vocabulary.py; LoRA on parameters: test_experts.py.


# ---------------------------------------------------------------- DoRA


DORA_CASES = {
    "llama-linear-embedding-bf16": (causal_lm(), BF16, dict(target_modules=["q_proj", "v_proj", "down_proj",
                                                                           "embed_tokens"]),
                                    ["model.embed_tokens.weight",
                                     *layer_tensors("self_attn.q_proj.weight", "mlp.down_proj.weight")]),
    "gpt2-fan-in-fan-out-fp16": (causal_lm("gpt2"), FP16, dict(target_modules=["c_attn", "c_proj"],
                                                               fan_in_fan_out=True),
                                 [f"transformer.h.{i}.{n}.weight" for i in (0, 1)
                                  for n in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")]),
    "resnet-conv-bf16": (resnet(), BF16, dict(target_modules=["convolution"]),
                         ["resnet.embedder.embedder.convolution.weight",
                          "resnet.encoder.stages.1.layers.0.layer.1.convolution.weight",
                          "resnet.encoder.stages.1.layers.0.shortcut.convolution.weight"]),
}


@pytest.mark.parametrize("case", list(DORA_CASES))
def test_dora(tmp_path, case):
    """W' = (m / ‖W + ΔW‖) · (W + ΔW), the norm over the unmerged weight, all in float32, one rounding.
    Within 1 ulp of PEFT (a norm computed in another reduction order may round differently)."""
    from peft import LoraConfig

    spec, dtype, lora, expected = DORA_CASES[case]
    base = save_base(spec, str(tmp_path / "base"), dtype, max_shard_size="4KB" if case.startswith("resnet") else "60KB")
    adapter = build_adapter(spec, base, str(tmp_path / "adapter"),
                            LoraConfig(r=4, lora_alpha=6, use_dora=True, **lora))
    assert any(k.endswith(".lora_magnitude_vector") for k in adapter_keys(adapter))
    reference, base_ckpt = merge_both(tmp_path, spec, base, [adapter], dtype)
    assert_changes(base_ckpt, reference, expected)

    fraction = assert_within_ulps(merge_without_ray(base, [adapter], str(tmp_path / "ours")), reference, max_ulps=1)
    print(f"DoRA {case}: {fraction:.4%} of elements bit-identical to PEFT")


# ---------------------------------------------------------------- conv LoRA

CONV_WEIGHTS = ["resnet.embedder.embedder.convolution.weight",  # 7x7, stride 2
                "resnet.encoder.stages.0.layers.0.layer.0.convolution.weight",  # 1x1
                "resnet.encoder.stages.0.layers.0.layer.1.convolution.weight",  # 3x3
                "resnet.encoder.stages.1.layers.0.shortcut.convolution.weight"]  # 1x1 shortcut


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
def test_conv2d_lora(tmp_path, dtype):
    """1x1 kernels: (B·A) as a matmul; kxk: conv2d(Aᵀ, B)ᵀ; then W += scale·ΔW in float32, one rounding."""
    from peft import LoraConfig

    spec = resnet()
    base = save_base(spec, str(tmp_path / "base"), dtype, max_shard_size="4KB")
    adapter = build_adapter(spec, base, str(tmp_path / "adapter"),
                            LoraConfig(r=4, lora_alpha=6, target_modules=["convolution"]))
    reference, base_ckpt = merge_both(tmp_path, spec, base, [adapter], dtype)
    assert_changes(base_ckpt, reference, CONV_WEIGHTS)

    assert_bit_identical(merge_without_ray(base, [adapter], str(tmp_path / "ours")), reference)


# ---------------------------------------------------------------- IA3, LoHa, LoKr


def ia3_config(case):
    from peft import IA3Config
    if case == "llama":
        return IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    if case == "gpt2":
        return IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                         fan_in_fan_out=True)
    return IA3Config(target_modules=["convolution", "layer.1.convolution"],
                     feedforward_modules=["layer.1.convolution"])


IA3_CASES = {
    # k/v scaled on the output side (rows), down_proj (feed-forward) on the input side (columns)
    "llama": (causal_lm(), layer_tensors("self_attn.k_proj.weight", "self_attn.v_proj.weight",
                                         "mlp.down_proj.weight")),
    # GPT-2 Conv1D (in×out storage) with biases: the output-side vector also scales the bias
    "gpt2": (causal_lm("gpt2"), [f"transformer.h.{i}.{n}.weight" for i in (0, 1)
                                 for n in ("attn.c_attn", "mlp.c_proj")]),
    "resnet": (resnet(), CONV_WEIGHTS),
}


@pytest.mark.parametrize("case", list(IA3_CASES))
def test_ia3(tmp_path, case):
    spec, expected = IA3_CASES[case]
    base = save_base(spec, str(tmp_path / "base"), max_shard_size="4KB" if case == "resnet" else "60KB")
    if case == "gpt2":  # GPT-2 initialises biases to zero, which would hide the bias scaling
        generator = torch.Generator().manual_seed(7)
        for shard in glob.glob(f"{base}/*.safetensors"):
            tensors = load_file(shard)
            for key in [k for k in tensors if k.endswith("c_attn.bias")]:
                tensors[key] = (0.02 * torch.randn(tensors[key].shape, generator=generator)).to(tensors[key].dtype)
            save_file(tensors, shard, metadata={"format": "pt"})
        expected = expected + [f"transformer.h.{i}.attn.c_attn.bias" for i in (0, 1)]
    adapter = build_adapter(spec, base, str(tmp_path / "adapter"), ia3_config(case))
    assert all(k.endswith(".ia3_l") for k in adapter_keys(adapter))
    reference, base_ckpt = merge_both(tmp_path, spec, base, [adapter], BF16)
    assert_changes(base_ckpt, reference, expected)

    assert_bit_identical(merge_without_ray(base, [adapter], str(tmp_path / "ours")), reference)


def lycoris_case(case):
    from peft import LoHaConfig, LoKrConfig
    llama_expected = layer_tensors("self_attn.q_proj.weight", "mlp.down_proj.weight")
    return {
        "loha-llama": (causal_lm(), LoHaConfig(r=4, alpha=6, target_modules=["q_proj", "down_proj"],
                                               rank_dropout=0.1, module_dropout=0.1), llama_expected),
        "loha-resnet-effective-conv2d": (resnet(), LoHaConfig(r=2, alpha=3, target_modules=["convolution"],
                                                              use_effective_conv2d=True), CONV_WEIGHTS),
        "lokr-llama": (causal_lm(), LoKrConfig(r=2, alpha=3, target_modules=["q_proj", "down_proj"]),
                       llama_expected),
        "lokr-llama-decompose-both": (causal_lm(), LoKrConfig(r=2, alpha=5, target_modules=["q_proj", "down_proj"],
                                                              decompose_both=True, rank_dropout=0.2),
                                      llama_expected),
        "lokr-llama-decompose-factor": (causal_lm(), LoKrConfig(r=2, alpha=5, target_modules=["q_proj", "down_proj"],
                                                                decompose_both=True, decompose_factor=4),
                                        llama_expected),
        "lokr-resnet-effective-conv2d": (resnet(), LoKrConfig(r=1, alpha=3, target_modules=["convolution"],
                                                              use_effective_conv2d=True, decompose_both=True),
                                         CONV_WEIGHTS),
    }[case]


@pytest.mark.parametrize("case", ["loha-llama", "loha-resnet-effective-conv2d", "lokr-llama",
                                  "lokr-llama-decompose-both", "lokr-llama-decompose-factor",
                                  "lokr-resnet-effective-conv2d"])
def test_loha_lokr(tmp_path, case):
    """LoHa: ((w1a·w1b) ⊙ (w2a·w2b))·alpha/r (CP form with hada_t1/t2); LoKr: kron(w1, w2)·alpha/r with
    either factor full or low-rank (lokr_t2 for effective conv2d); W += ΔW in float32, one rounding."""
    spec, config, expected = lycoris_case(case)
    base = save_base(spec, str(tmp_path / "base"), max_shard_size="4KB" if "resnet" in case else "60KB")
    adapter = build_adapter(spec, base, str(tmp_path / "adapter"), config)
    keys = adapter_keys(adapter)
    if case == "loha-resnet-effective-conv2d":
        assert any(k.endswith(".hada_t1") for k in keys)
    if case == "lokr-resnet-effective-conv2d":
        assert any(k.endswith(".lokr_t2") for k in keys)
    if case == "lokr-llama-decompose-both":
        assert any(k.endswith(".lokr_w1_a") for k in keys)
    reference, base_ckpt = merge_both(tmp_path, spec, base, [adapter], BF16)
    assert_changes(base_ckpt, reference, expected)

    assert_bit_identical(merge_without_ray(base, [adapter], str(tmp_path / "ours")), reference)


# ---------------------------------------------------------------- several adapters


def two_adapters(tmp_path):
    from peft import LoraConfig

    spec = causal_lm()
    base = make_base(str(tmp_path / "base"))
    first = build_adapter(spec, base, str(tmp_path / "a"), LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"]), seed=1)
    second = build_adapter(spec, base, str(tmp_path / "b"), LoraConfig(
        r=4, lora_alpha=7, use_rslora=True, target_modules=["q_proj", "v_proj"]), seed=2)
    return spec, base, first, second


def test_two_lora_adapters_sequential_equal_peft_bit_for_bit(tmp_path):
    """load_adapter ×2 then merge_and_unload(adapter_names=[a, b]): PEFT adds a's delta, rounds to bf16,
    then adds b's and rounds again; --sequential does the same. Different ranks, alphas, rslora and
    overlapping targets."""
    spec, base, first, second = two_adapters(tmp_path)
    reference, base_ckpt = merge_both(tmp_path, spec, base, [first, second], BF16)
    assert_changes(base_ckpt, reference, layer_tensors("self_attn.q_proj.weight", "mlp.up_proj.weight"))
    assert_bit_identical(merge_without_ray(base, [first, second], str(tmp_path / "ours"), sequential=True),
                         reference)


def float64_sum(base: str, adapters: list[str], weights: list[float]) -> dict[str, torch.Tensor]:
    """W + Σ wᵢ·sᵢ·(Bᵢ @ Aᵢ) in float64, from the saved files (the published definition)."""
    import json
    import math

    merged = {k: v.double() for k, v in load_checkpoint(base).items()}
    for adapter, weight in zip(adapters, weights):
        config = json.load(open(f"{adapter}/adapter_config.json"))
        tensors = load_file(f"{adapter}/adapter_model.safetensors")
        scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
        for key, a in tensors.items():
            if key.endswith(".lora_A.weight"):
                module = key[len("base_model.model."):-len(".lora_A.weight")]
                b = tensors[key.replace("lora_A", "lora_B")]
                merged[f"{module}.weight"] += weight * scale * (b.double() @ a.double())
    return merged


@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.7, 0.3]])
def test_two_lora_adapters_rounded_once(tmp_path, weights):
    """By default W + Σ wᵢ·ΔWᵢ is rounded once: within 1 ulp of the float64 sum everywhere, and with
    weights 1 equal to PEFT's sequential merge except where the intermediate rounding PEFT does mattered."""
    spec, base, first, second = two_adapters(tmp_path)
    ours = merge_without_ray(base, [first, second], str(tmp_path / "ours"), weights=weights)
    exact = {k: v.to(BF16) for k, v in float64_sum(base, [first, second], weights).items()}
    fraction = assert_within_ulps(ours, exact, max_ulps=1)
    assert fraction > 0.99
    if weights == [1.0, 1.0]:
        reference, _ = merge_both(tmp_path, spec, base, [first, second], BF16)
        changed = changed_tensors(reference, ours)
        assert changed and all("q_proj" in k or "v_proj" in k for k in changed), "only doubly-adapted tensors differ"


def test_dora_with_another_adapter(tmp_path):
    """DoRA first, then LoRA on the same tensors: PEFT merges the DoRA adapter onto the base, rounds, then
    adds the LoRA delta; lora-merge does the same (within 1 ulp). In the other order PEFT normalises by a
    weight it recovers by unmerging the LoRA (lossily), which is neither its forward pass nor ours: refused."""
    from peft import LoraConfig

    spec = causal_lm()
    base = make_base(str(tmp_path / "base"))
    dora = build_adapter(spec, base, str(tmp_path / "dora"), LoraConfig(
        r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]), seed=1)
    lora = build_adapter(spec, base, str(tmp_path / "lora"), LoraConfig(
        r=4, lora_alpha=6, target_modules=["q_proj", "o_proj"]), seed=2)
    reference, base_ckpt = merge_both(tmp_path, spec, base, [dora, lora], BF16)
    assert_changes(base_ckpt, reference, layer_tensors("self_attn.q_proj.weight", "self_attn.v_proj.weight",
                                                       "self_attn.o_proj.weight"))
    assert_within_ulps(merge_without_ray(base, [dora, lora], str(tmp_path / "ours")), reference, max_ulps=1)

    with pytest.raises(InputError, match=r"q_proj.lora_A.weight: applies DoRA to model.layers.0.self_attn.q_proj"
                                         r".weight after another adapter updated it.*give the DoRA adapter first"):
        merge_without_ray(base, [lora, dora], str(tmp_path / "reversed"))
    with pytest.raises(InputError, match=r"--weight 0.5: .* by dora, which is not a sum: it cannot be weighted"):
        merge_without_ray(base, [dora, lora], str(tmp_path / "weighted"), weights=[0.5, 1.0])
