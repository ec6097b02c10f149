"""A quantized base in a format lora-merge has no codec for (here GPTQ: qweight, qzeros, scales, g_idx)
merges wherever the adapters touch only what it stores plainly, its quantized tensors and config.json
copied as they are; an adapter on one of its quantized weights is refused, naming the tensor and format."""

from __future__ import annotations

import json

import pytest
import torch

from merge_core.errors import InputError
from tests.local_merge import merge_without_ray
from tests.quantized_models import read_config, stored_tensors, write_sharded
from tests.reference import make_adapter, make_base, peft_merged

GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True, "damp_percent": 0.01,
        "true_sequential": True, "checkpoint_format": "gptq"}
MLP = ("gate_proj", "up_proj", "down_proj")


def gptq_style(plain: str, path: str) -> str:
    """The plain model's attention kept bf16, its MLP linears stored as GPTQ stores them (random codes:
    nothing decodes them here)."""
    g = torch.Generator().manual_seed(0)
    tensors = stored_tensors(plain)
    for name in [n for n in tensors if n.endswith(tuple(f"mlp.{m}.weight" for m in MLP))]:
        rows, columns = tensors.pop(name).shape
        module = name[: -len(".weight")]
        tensors[module + ".qweight"] = torch.randint(-2**31, 2**31 - 1, (columns // 8, rows), generator=g,
                                                     dtype=torch.int32)
        tensors[module + ".qzeros"] = torch.randint(-2**31, 2**31 - 1, (columns // 32, rows // 8), generator=g,
                                                    dtype=torch.int32)
        tensors[module + ".scales"] = torch.rand(columns // 32, rows, generator=g).to(torch.float16)
        tensors[module + ".g_idx"] = torch.arange(columns, dtype=torch.int32) // 32
    config = read_config(plain) | {"quantization_config": GPTQ}
    return write_sharded(path, tensors, config, shards=2)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq")
    plain = make_base(str(root / "plain"))
    return plain, gptq_style(plain, str(root / "gptq")), root


def test_an_attention_adapter_merges_and_the_gptq_tensors_are_copied(bases):
    plain, gptq, root = bases
    adapter = make_adapter(str(root / "attention"), target_modules=["q_proj", "v_proj"])
    reference = peft_merged(plain, adapter, str(root / "peft"))
    out = str(root / "out")
    merged = merge_without_ray(gptq, [adapter], out)
    base = stored_tensors(gptq)
    assert set(merged) == set(base)
    changed = sorted(n for n in base if not torch.equal(merged[n].view(torch.uint8), base[n].view(torch.uint8)))
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed), changed
    for name in changed:
        assert torch.equal(merged[name], reference[name]), name  # bit for bit PEFT's merge of the plain model
    assert read_config(out) == read_config(gptq)
    assert json.load(open(f"{out}/merge_manifest.json"))["model_changes"]["requantized_tensors"] == 0


def test_an_adapter_on_a_gptq_weight_is_refused_by_name(bases):
    plain, gptq, root = bases
    adapter = make_adapter(str(root / "mlp"), target_modules=["q_proj", "down_proj"])
    with pytest.raises(InputError) as info:
        merge_without_ray(gptq, [adapter], str(root / "refused"))
    message = str(info.value)
    assert ("targets model.layers.0.mlp.down_proj.weight, which the base stores quantized by gptq "
            "(model.layers.0.mlp.down_proj.g_idx, model.layers.0.mlp.down_proj.qweight, "
            "model.layers.0.mlp.down_proj.qzeros, model.layers.0.mlp.down_proj.scales), a format lora-merge has no "
            "codec for") in message, message
    assert message.startswith(f"{root / 'mlp'}/adapter_model.safetensors: tensor ")
    attention = make_adapter(str(root / "attention-only"), target_modules=["q_proj"])
    with pytest.raises(InputError, match="--dequantize: lora-merge has no codec for gptq"):
        merge_without_ray(gptq, [attention], str(root / "dequantized"), dequantize=True)
    assert not (root / "refused").exists() and not (root / "dequantized").exists()
