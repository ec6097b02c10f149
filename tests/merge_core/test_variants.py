"""PEFT variants beyond plain LoRA on Linear layers: lora-merge must write what PEFT's merge_and_unload +
save_pretrained writes, bit for bit (DoRA and several adapters: within 1 ulp).

Each test builds a tiny real model saved in several shards, an adapter made by get_peft_model with
non-zero trained-looking weights, PEFT's merged reference (checked to differ from the base in the
targeted tensors, so a builder that produced a no-op adapter fails here rather than passing vacuously),
then runs the worker and final-task code without Ray. The math each variant needs is PEFT's own
(peft/tuners/lora/layer.py, variants.py, ia3/, loha/, lokr/): see the PEFT merge spec that came with these tests.

Until lora-merge implements a variant, its test fails because load_adapter refuses the adapter with an
InputError (or, for several plain LoRA adapters, because the result differs from PEFT's).
"""

from __future__ import annotations

import glob

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_core.errors import InputError
from tests.merge_core.test_parity import merge_without_ray
from tests.reference import TINY, assert_bit_identical, changed_tensors, load_checkpoint, make_base
from tests.variant_reference import (adapter_keys, assert_within_ulps, build_adapter, causal_lm, gpt_oss,
                                     llama_seq_cls, mixtral, peft_reference, qwen3_moe, read_config, resnet,
                                     save_base)

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


# ---------------------------------------------------------------- 1. embedding LoRA, resized vocabulary


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
def test_embedding_lora(tmp_path, dtype):
    """lora_embedding_A/B on embed_tokens (delta rounded to the base dtype before the add), next to q/v LoRA."""
    from peft import LoraConfig

    spec = causal_lm()
    base = make_base(str(tmp_path / "base"), dtype=dtype)
    adapter = build_adapter(spec, base, str(tmp_path / "adapter"),
                            LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", *ATTN]))
    assert "base_model.model.model.embed_tokens.base_layer.weight" in adapter_keys(adapter)
    reference, base_ckpt = merge_both(tmp_path, spec, base, [adapter], dtype)
    assert_changes(base_ckpt, reference,
                   ["model.embed_tokens.weight", *layer_tensors("self_attn.q_proj.weight", "self_attn.v_proj.weight")])
    assert torch.equal(reference["lm_head.weight"], base_ckpt["lm_head.weight"])

    assert_bit_identical(merge_without_ray(base, [adapter], str(tmp_path / "ours")), reference)


def test_embedding_copy_differing_from_base_is_merged_as_peft_does_or_refused(tmp_path):
    """PEFT loads the adapter's saved embed_tokens.base_layer.weight over the base's embedding before
    merging. An adapter whose copy differs from the base (made on another model) must either be merged
    as PEFT merges it (from the adapter's copy) or be refused; never merged onto the base's tensor."""
    from peft import LoraConfig

    spec = causal_lm()
    base = make_base(str(tmp_path / "base"))
    other = make_base(str(tmp_path / "other"), seed=5)
    adapter = build_adapter(spec, other, str(tmp_path / "adapter"),
                            LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"]))
    reference, base_ckpt = merge_both(tmp_path, spec, base, [adapter], BF16)
    assert_changes(base_ckpt, reference, ["model.embed_tokens.weight"])

    try:
        ours = merge_without_ray(base, [adapter], str(tmp_path / "ours"))
    except InputError as exc:
        assert "embed_tokens" in str(exc), exc
        return
    assert_bit_identical(ours, reference)


RESIZED_CASES = {
    "untargeted": (dict(target_modules=ATTN), 2),  # embed_tokens.weight, lm_head.weight
    "targeted": (dict(target_modules=["embed_tokens", "lm_head", "q_proj"]), 2),  # their base_layer.weight
    # lm_head.weight (the trained copy), and again as lm_head.modules_to_save.weight (which PEFT does not
    # load) beside lm_head.original_module.weight
    "head-modules-to-save": (dict(target_modules=ATTN, modules_to_save=["lm_head"]), 4),
}


@pytest.mark.parametrize("case", list(RESIZED_CASES))
def test_resized_vocabulary(tmp_path, case):
    """resize_token_embeddings(100) before get_peft_model on a 96-token base: the adapter carries the
    (100, H) embedding and lm_head (full copies, or base_layer copies plus LoRA). PEFT needs the base
    resized first; the merge must write 100-row tensors and say vocab_size 100 in config.json."""
    from peft import LoraConfig

    lora, copies = RESIZED_CASES[case]
    targets = lora["target_modules"]
    spec = causal_lm()
    base = make_base(str(tmp_path / "base"))
    adapter = build_adapter(spec, base, str(tmp_path / "adapter"), LoraConfig(r=4, lora_alpha=8, **lora), resize=100)
    full_copies = [k for k in adapter_keys(adapter) if "lora_" not in k and ("embed_tokens" in k or "lm_head" in k)]
    assert len(full_copies) == copies, full_copies
    reference, base_ckpt = merge_both(tmp_path, spec, base, [adapter], BF16, resize=100)
    assert reference["model.embed_tokens.weight"].shape == (100, 64) == reference["lm_head.weight"].shape
    assert read_config(str(tmp_path / "peft"))["vocab_size"] == 100
    assert read_config(base)["vocab_size"] == 96
    assert torch.equal(reference["model.embed_tokens.weight"][:96], base_ckpt["model.embed_tokens.weight"]) == (
        "embed_tokens" not in targets), "untargeted: the old rows are the base's; targeted: LoRA changed them"

    out = str(tmp_path / "ours")
    assert_bit_identical(merge_without_ray(base, [adapter], out), reference)
    ours_config, peft_config = read_config(out), read_config(str(tmp_path / "peft"))
    assert ours_config["vocab_size"] == 100
    assert {k: v for k, v in ours_config.items() if k != "vocab_size"} == {
        k: v for k, v in read_config(base).items() if k != "vocab_size"}, "only vocab_size changes"


def phi():
    """Phi's output head has a bias, which a resized vocabulary resizes too."""
    from transformers import PhiConfig, PhiForCausalLM
    return PhiForCausalLM, PhiConfig(**TINY)


RESIZED_MODELS = {
    # only the embedding is stored; PEFT saves it and the (same, shared) head: one tensor, still tied
    "llama-tied": (lambda: causal_lm(tie_word_embeddings=True), ["model.embed_tokens.weight"]),
    "phi-head-bias": (phi, ["model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"]),
    "gpt2-wte": (lambda: causal_lm("gpt2"), ["transformer.wte.weight"]),  # GPT-2's names, tied
}


@pytest.mark.parametrize("case", list(RESIZED_MODELS))
def test_resized_vocabulary_of_other_models(tmp_path, case):
    from peft import LoraConfig

    model, resized = RESIZED_MODELS[case]
    spec = model()
    base = save_base(spec, str(tmp_path / "base"))
    targets = ["c_attn"] if case.startswith("gpt2") else ATTN
    adapter = build_adapter(spec, base, str(tmp_path / "adapter"),
                            LoraConfig(r=4, lora_alpha=8, target_modules=targets), resize=100)
    reference, base_ckpt = merge_both(tmp_path, spec, base, [adapter], BF16, resize=100)
    assert all(reference[name].shape[0] == 100 != base_ckpt[name].shape[0] for name in resized)
    out = str(tmp_path / "ours")
    assert_bit_identical(merge_without_ray(base, [adapter], out), reference)
    assert read_config(out)["vocab_size"] == read_config(str(tmp_path / "peft"))["vocab_size"] == 100


def test_resized_vocabulary_without_its_head_is_refused(tmp_path):
    """embed_tokens targeted after a resize but lm_head (untied) neither targeted nor saved: the adapter
    has no 100-row head, and PEFT's merge would take the new head rows from resize_token_embeddings'
    initialisation at merge time. Refused, naming the head left at the old size."""
    from peft import LoraConfig

    spec = causal_lm()
    base = make_base(str(tmp_path / "base"))
    adapter = build_adapter(spec, base, str(tmp_path / "adapter"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]), resize=100)
    assert not any("lm_head" in k for k in adapter_keys(adapter))
    with pytest.raises(InputError, match=r"lm_head.weight: keeps 96 rows while the adapter resizes the vocabulary "
                                         r"to 100.*save_embedding_layers=True"):
        merge_without_ray(base, [adapter], str(tmp_path / "ours"))


# ---------------------------------------------------------------- 2. modules_to_save


@pytest.mark.parametrize("case", ["lm_head", "seq-cls-score"])
def test_modules_to_save(tmp_path, case):
    """A trained full copy of a module (saved under its plain name) replaces the base tensor, rounded to the
    base dtype. SEQ_CLS adds the `score` head to modules_to_save by itself."""
    from peft import LoraConfig

    if case == "lm_head":
        spec, config, head = causal_lm(), LoraConfig(r=4, lora_alpha=8, target_modules=ATTN,
                                                     modules_to_save=["lm_head"]), "lm_head.weight"
    else:
        spec, config, head = llama_seq_cls(), LoraConfig(r=4, lora_alpha=8, target_modules=ATTN,
                                                         task_type="SEQ_CLS"), "score.weight"
    base = save_base(spec, str(tmp_path / "base"))
    adapter = build_adapter(spec, base, str(tmp_path / "adapter"), config)
    assert f"base_model.model.{head}" in adapter_keys(adapter)
    reference, base_ckpt = merge_both(tmp_path, spec, base, [adapter], BF16)
    assert_changes(base_ckpt, reference, [head, *layer_tensors("self_attn.q_proj.weight")])

    assert_bit_identical(merge_without_ray(base, [adapter], str(tmp_path / "ours")), reference)


# ---------------------------------------------------------------- 3. tied embeddings


TIED_CASES = {
    # embed_tokens LoRA: the shared tensor changes, the model stays tied (one tensor on disk)
    "embed-lora": (dict(target_modules=["embed_tokens", "q_proj"]), True),
    # lm_head LoRA on a tied model: PEFT adds the lm_head delta to the shared tensor, i.e. to embed_tokens
    "lm-head-lora": (dict(target_modules=["lm_head", "q_proj"]), True),
    # both LoRA-targeted: the adapter saves the shared tensor twice (embed_tokens and lm_head base_layer)
    "embed-and-head-lora": (dict(target_modules=["embed_tokens", "lm_head", "q_proj"]), True),
    # a trained lm_head copy: the embeddings diverge, PEFT unties them and writes lm_head.weight
    "lm-head-modules-to-save": (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), False),
    # a trained embedding copy: the head keeps the base's embedding, written as lm_head.weight
    "embed-modules-to-save": (dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]), False),
}


@pytest.mark.parametrize("case", list(TIED_CASES))
def test_tied_embeddings(tmp_path, case):
    from peft import LoraConfig

    lora, still_tied = TIED_CASES[case]
    spec = causal_lm(tie_word_embeddings=True)
    base = make_base(str(tmp_path / "base"), tie_word_embeddings=True)
    base_ckpt = load_checkpoint(base)
    assert "lm_head.weight" not in base_ckpt and read_config(base)["tie_word_embeddings"] is True
    adapter = build_adapter(spec, base, str(tmp_path / "adapter"), LoraConfig(r=4, lora_alpha=8, **lora))
    reference, _ = merge_both(tmp_path, spec, base, [adapter], BF16)
    peft_config = read_config(str(tmp_path / "peft"))
    assert peft_config["tie_word_embeddings"] is still_tied
    assert ("lm_head.weight" in reference) is not still_tied
    assert_changes(base_ckpt, reference, [*(["model.embed_tokens.weight"] if still_tied else []),
                                          *layer_tensors("self_attn.q_proj.weight")])
    if not still_tied:  # one of the two is the trained copy, the other keeps the base's embedding
        trained, kept = ("lm_head.weight", "model.embed_tokens.weight")[::1 if "lm-head" in case else -1]
        assert not torch.equal(reference[trained], base_ckpt["model.embed_tokens.weight"])
        assert torch.equal(reference[kept], base_ckpt["model.embed_tokens.weight"])

    out = str(tmp_path / "ours")
    assert_bit_identical(merge_without_ray(base, [adapter], out), reference)
    assert read_config(out)["tie_word_embeddings"] is still_tied


def test_tied_head_lora_while_the_embedding_copy_unties_is_refused(tmp_path):
    """LoRA on lm_head lands on the shared tensor, but a trained embed_tokens copy unties the two: the
    head's delta would belong to the original, which only the untied head keeps. Refused by name."""
    from peft import LoraConfig

    spec = causal_lm(tie_word_embeddings=True)
    base = make_base(str(tmp_path / "base"), tie_word_embeddings=True)
    adapter = build_adapter(spec, base, str(tmp_path / "adapter"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"], modules_to_save=["embed_tokens"]))
    with pytest.raises(InputError, match=r"lm_head.* updates lm_head, which the base ties to "
                                         r"model.embed_tokens.weight, while a trained copy of one of them unties"):
        merge_without_ray(base, [adapter], str(tmp_path / "ours"))


# ---------------------------------------------------------------- 4. DoRA


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


# ---------------------------------------------------------------- 5. target_parameters (MoE experts)


EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def per_expert(module: str, *parts: str) -> list[str]:
    return [f"model.layers.{i}.{module}.experts.{e}.{part}.weight" for i in (0, 1) for e in range(4) for part in parts]


PARAMETER_CASES = {
    # experts stored 3-D as the model holds them, (E, in, out) (is_transposed)
    "gpt-oss": (gpt_oss, EXPERTS, layer_tensors(*EXPERTS)),
    # fused (E, out, in) in memory, stored per expert: w1 and w3 are the gate_up rows, w2 down
    "mixtral": (mixtral, EXPERTS, per_expert("block_sparse_moe", "w1", "w2", "w3")),
    # the same with gate_proj / up_proj / down_proj per expert, as most MoE families store them
    "qwen3-moe": (qwen3_moe, EXPERTS, per_expert("mlp", "gate_proj", "up_proj", "down_proj")),
    # a bare parameter name, which PEFT matches only on modules that own such a parameter (not q_proj)
    "mixtral-bare-name": (mixtral, ["down_proj"], per_expert("block_sparse_moe", "w2")),
    # one expert parameter only: a single wrapper, no nesting
    "mixtral-down-only": (mixtral, ["mlp.experts.down_proj"], per_expert("block_sparse_moe", "w2")),
    # a 2-D weight adapted as a parameter: Linear's ΔW, but PEFT rounds it before the add
    "llama-2d-weight": (causal_lm, ["self_attn.o_proj.weight"], layer_tensors("self_attn.o_proj.weight")),
}


@pytest.mark.parametrize("case", list(PARAMETER_CASES))
def test_target_parameters(tmp_path, case):
    """LoRA on parameters (target_parameters: PEFT's ParamWrapper, nested once per targeted parameter of a
    module) plus ordinary LoRA on q_proj, in whatever layout the model's checkpoint stores the experts."""
    from peft import LoraConfig

    model, parameters, expected = PARAMETER_CASES[case]
    spec = model()
    base = save_base(spec, str(tmp_path / "base"))
    adapter = build_adapter(spec, base, str(tmp_path / "adapter"), LoraConfig(
        r=2, lora_alpha=6, target_modules=["q_proj"], target_parameters=parameters))
    if len(parameters) == 2:
        keys = adapter_keys(adapter)
        assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in keys  # gate_up_proj
        assert "base_model.model.model.layers.0.mlp.experts.lora_A.weight" in keys  # down_proj
    reference, base_ckpt = merge_both(tmp_path, spec, base, [adapter], BF16)
    assert_changes(base_ckpt, reference, [*expected, *layer_tensors("self_attn.q_proj.weight")])

    assert_bit_identical(merge_without_ray(base, [adapter], str(tmp_path / "ours")), reference)


# ---------------------------------------------------------------- 6. conv LoRA

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


# ---------------------------------------------------------------- 7. IA3, LoHa, LoKr


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


# ---------------------------------------------------------------- 8. several adapters


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
