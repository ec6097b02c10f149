"""LoRA on parameters (target_parameters: PEFT's ParamWrapper, MoE experts; see merge_core/planning/experts.py):
lora-merge writes what PEFT's merge_and_unload + save_pretrained writes, bit for bit, whichever way the
checkpoint stores the experts. How the tests are built: see tests/merge_core/numerics/test_variants.py.
"""

from __future__ import annotations

import pytest

from tests.local_merge import merge_without_ray
from tests.reference import assert_bit_identical
from tests.variant_reference import (
    BF16,
    adapter_keys,
    assert_changes,
    build_adapter,
    causal_lm,
    gpt_oss,
    layer_tensors,
    merge_both,
    mixtral,
    qwen3_moe,
    save_base,
)

# ---------------------------------------------------------------- target_parameters (MoE experts)


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
