"""Embeddings, output heads and whole-module copies (see merge_core/planning/vocabulary.py): lora-merge writes what
PEFT's merge_and_unload + save_pretrained writes, bit for bit, including the changes of the model's
layout (a resized vocabulary, an untied head) and of its config.json. How the tests are built: see
tests/merge_core/numerics/test_variants.py.
"""

from __future__ import annotations

import pytest
import torch

from merge_core.errors import InputError
from tests.local_merge import merge_without_ray
from tests.reference import TINY, assert_bit_identical, load_checkpoint, make_base
from tests.variant_reference import (
    ATTN,
    BF16,
    FP16,
    adapter_keys,
    assert_changes,
    build_adapter,
    causal_lm,
    layer_tensors,
    llama_seq_cls,
    merge_both,
    read_config,
    save_base,
)

# ---------------------------------------------------------------- embedding LoRA, resized vocabulary


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
    ours_config = read_config(out)
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


# ---------------------------------------------------------------- modules_to_save


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


# ---------------------------------------------------------------- tied embeddings


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
