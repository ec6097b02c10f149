"""Merges into ModelOpt checkpoints (NVFP4, FP8 per tensor, per channel and in 128×128 blocks, MXFP8, a
MIXED_PRECISION DeepSeek-shaped MoE whose routed experts are NVFP4 and attention and shared experts FP8) and an
fbgemm FP8 one, built from transformers models with the formats' published math (tests/modelopt_models.py),
against that math's requantization of PEFT's float32 merge, tensor by tensor: `--scales fresh` (NVFP4's fused
siblings sharing one weight_scale_2 from all of their W′), `--scales keep` (the base's scales, codes re-rounded);
`--dequantize` equal to PEFT's float32 merge rounded to bf16, without hf_quant_config.json.

The reference merge is PEFT's merge_and_unload in float32 into a model whose quantized weights hold their exact
float32 dequantized values.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.ct_models import llama, random_model
from tests.modelopt_models import (
    ModelOptCheckpoint,
    decoder_linears,
    expected_parts,
    save_fbgemm,
    save_llama,
    save_modelopt,
)
from tests.quantized_merges import (
    LORA_ON,
    dequantized_as_peft,
    llama_cls,
    lora,
    reference_case,
    requantized_as_expected,
    spot_check_finds_the_base_codes,
)
from tests.quantized_models import DEEPSEEK_TINY
from tests.reference import load_checkpoint

HF_QUANT_CONFIG = "hf_quant_config.json"


def deepseek_cls():
    from transformers import DeepseekV3ForCausalLM
    return DeepseekV3ForCausalLM


def llama_in(algo: str, **options):
    return lambda path: save_llama(path, algo, **options)


def mixed_deepseek(path: str) -> ModelOptCheckpoint:
    """Routed experts NVFP4 (each expert's gate/up sharing weight_scale_2), attention and the shared expert FP8
    per tensor, layer 0's dense MLP left in bf16: Nemotron 3 Ultra's and Qwen3.6 NVFP4's layout."""
    from transformers import DeepseekV3Config
    model = random_model(deepseek_cls(), DeepseekV3Config(**DEEPSEEK_TINY))
    algos = {m: "NVFP4" if ".experts." in m and "shared" not in m else "FP8"
             for m in decoder_linears(model, lambda m: ".layers.0.mlp." not in m)}
    return save_modelopt(path, model, algos, exclude=[], mixed=True)


def fbgemm_llama(path: str) -> ModelOptCheckpoint:
    """Every decoder linear but layer 0's attention in FP8 per row, as Llama-3.1-405B-Instruct-FP8 leaves some
    layers in bf16 (modules_to_not_convert)."""
    model = llama()
    kept = [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
    return save_fbgemm(path, model, decoder_linears(model, lambda m: m not in kept), kept + ["lm_head"])


# name: (builder, model class, LoRA config, whether fresh scales tie siblings)
CASES = {
    "nvfp4-llama": (llama_in("NVFP4"), llama_cls, lambda: lora(target_modules=LORA_ON), True),
    "fp8-llama-in-config-json": (llama_in("FP8", in_config=True), llama_cls, lambda: lora(target_modules=LORA_ON),
                                 False),
    "fp8-per-channel-llama": (llama_in("FP8_PER_CHANNEL_PER_TOKEN"), llama_cls,
                              lambda: lora(target_modules=LORA_ON), False),
    "fp8-blocks-llama": (llama_in("FP8_PB_WO"), llama_cls, lambda: lora(target_modules=LORA_ON), False),
    "mxfp8-llama": (llama_in("MXFP8"), llama_cls, lambda: lora(target_modules=LORA_ON), False),
    "mixed-deepseek-moe": (mixed_deepseek, deepseek_cls, lambda: lora(
        target_modules=["q_b_proj", "kv_a_proj_with_mqa", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]), True),
    "fbgemm-llama": (fbgemm_llama, llama_cls, lambda: lora(target_modules=LORA_ON + ["k_proj"]), False),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    build, model_cls, config, ties = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    checkpoint = build(str(root / "base"))
    adapter, reference = reference_case(checkpoint, model_cls(), config(), root)
    return checkpoint, adapter, reference, ties, root


@pytest.mark.parametrize("scales", ["fresh", "keep"])
def test_each_format_is_the_reference_requantization_of_the_peft_merge(case, scales):
    checkpoint, adapter, reference, ties, root = case
    out = str(root / f"out-{scales}")
    requantization = requantized_as_expected(checkpoint, adapter, reference, out, scales, expected_parts,
                                             checkpoint.algos)
    merged = load_checkpoint(out)
    for plain in (n for n in checkpoint.dequantized if n not in checkpoint.exact and n in reference):
        assert torch.equal(merged[plain], reference[plain].to(merged[plain].dtype)), plain  # bf16, as PEFT
    tied = requantization["tied"]
    assert (bool(tied) and all(len(group) > 1 for group in tied)) if scales == "fresh" and ties else tied == []
    assert os.path.exists(f"{out}/{HF_QUANT_CONFIG}") == os.path.exists(f"{checkpoint.path}/{HF_QUANT_CONFIG}")


def test_dequantize_writes_the_peft_merge_rounded_to_bf16(case):
    checkpoint, adapter, reference, _, root = case
    out = str(root / "out-bf16")
    dequantized_as_peft(checkpoint, adapter, reference, out)
    assert not os.path.exists(f"{out}/{HF_QUANT_CONFIG}"), "engines would read the bf16 output as quantized"


def test_the_spot_check_finds_a_requantized_weight_that_is_not_the_merge(case, tmp_path):
    checkpoint, adapter, *_ = case
    spot_check_finds_the_base_codes(checkpoint, adapter, str(tmp_path))
