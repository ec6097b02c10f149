"""Quantized bases through the `lora-merge` command: merge with validation, verify and plan, S3 to S3,
--dequantize loaded by transformers against PEFT on the dequantized base, and bad quantized input."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch

from jobs.cli import main
from merge_core.names import INDEX_NAME
from tests.conftest import BUCKET, list_keys, open_uploads, upload_dir
from tests.jobs.conftest import cli
from tests.jobs.quantized_jobs import drop_tensor
from tests.quantized_models import save_dequantized, save_fp8_llama, save_int4_kimi_style, stored_tensors
from tests.variant_reference import build_adapter


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    """An FP8 Llama with partial edge blocks, its dequantized bf16 twin, and a LoRA made on the twin."""
    from peft import LoraConfig
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("fp8")
    checkpoint = save_fp8_llama(str(root / "base"))
    twin = save_dequantized(checkpoint, str(root / "twin"))
    adapter = build_adapter((LlamaForCausalLM, None), twin, str(root / "adapter"),
                            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), seed=3)
    return checkpoint, twin, adapter


def test_fp8_merge_validates_verifies_and_plans(fp8, ray_session, tmp_path):
    cluster, _ = ray_session
    checkpoint, _, adapter = fp8
    out = str(tmp_path / "out")
    run = cli("merge", "--base", checkpoint.path, "--adapter", adapter, "--output", out,
                  "--ray-address", cluster.address)
    assert run.returncode == 0, run.stderr
    assert "adapter kept" in run.stdout and "median" in run.stdout
    base, merged = stored_tensors(checkpoint.path), stored_tensors(out)
    assert {k: (v.dtype, v.shape) for k, v in merged.items()} == {k: (v.dtype, v.shape) for k, v in base.items()}
    changed = {k for k in base if not torch.equal(base[k].view(torch.uint8), merged[k].view(torch.uint8))}
    # --scales keep (the default): only the touched weights' codes move, never a scale
    assert changed == {f"model.layers.{i}.{m}.weight" for i in (0, 1) for m in ("self_attn.q_proj",
                                                                                 "self_attn.v_proj", "mlp.down_proj")}
    verified = cli("verify", "--base", checkpoint.path, "--adapter", adapter, "--merged", out,
                       "--ray-address", cluster.address)
    assert verified.returncode == 0, verified.stderr
    planned = cli("plan", "--base", checkpoint.path, "--adapter", adapter)
    assert planned.returncode == 0, planned.stderr
    assert "(fp8 e4m3, 128×128 blocks: 14 quantized weights)" in planned.stdout
    assert "requantizes" in planned.stdout


def test_fp8_dequantized_loads_as_a_plain_model_and_predicts_as_peft(fp8, ray_session, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    cluster, _ = ray_session
    checkpoint, twin, adapter = fp8
    out = str(tmp_path / "out")
    run = cli("merge", "--base", checkpoint.path, "--adapter", adapter, "--output", out, "--dequantize",
                  "--ray-address", cluster.address)
    assert run.returncode == 0, run.stderr
    assert "quantization_config" not in json.load(open(os.path.join(out, "config.json")))
    tokens = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        ours = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(tokens).logits
        peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(twin, dtype=torch.float32),
                                         adapter).eval()(tokens).logits
        plain = LlamaForCausalLM.from_pretrained(twin, dtype=torch.float32).eval()(tokens).logits
    assert (ours - plain).abs().max() > 100 * (ours - peft).abs().max(), "the adapter is in the merged model"
    torch.testing.assert_close(ours, peft, rtol=0, atol=0.05)


def test_int4_s3_to_s3(s3, ray_session, tmp_path):
    from peft import LoraConfig
    from transformers import DeepseekV3ForCausalLM

    cluster, _ = ray_session
    checkpoint = save_int4_kimi_style(str(tmp_path / "base"))
    twin = save_dequantized(checkpoint, str(tmp_path / "twin"))
    adapter = build_adapter((DeepseekV3ForCausalLM, None), twin, str(tmp_path / "adapter"), LoraConfig(
        r=4, lora_alpha=8, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    base_uri, adapter_uri = upload_dir(s3, checkpoint.path, "int4/base"), upload_dir(s3, adapter, "int4/adapter")
    out = f"s3://{BUCKET}/int4/out"
    run = cli("merge", "--base", base_uri, "--adapter", adapter_uri, "--output", out, "--part-size-mb", "5",
                  "--ray-address", cluster.address)
    assert run.returncode == 0, run.stderr
    assert INDEX_NAME in list_keys(s3, "int4/out") and open_uploads(s3, "int4/out") == []
    verified = cli("verify", "--base", base_uri, "--adapter", adapter_uri, "--merged", out,
                       "--ray-address", cluster.address)
    assert verified.returncode == 0, verified.stderr


def _without_scale(base: str) -> None:
    drop_tensor(base, "model.layers.0.self_attn.q_proj.weight_scale_inv")


def _config(edit):
    def apply(base: str) -> None:
        path = os.path.join(base, "config.json")
        config = json.load(open(path))
        edit(config["quantization_config"])
        json.dump(config, open(path, "w"))
    return apply


BAD = {
    "a weight without its scale": (_without_scale, "tensor model.layers.0.self_attn.q_proj.weight: is F8_E4M3 but "
                                   "has no model.layers.0.self_attn.q_proj.weight_scale_inv beside it"),
    "another block size": (_config(lambda q: q.update(weight_block_size=[64, 64])),
                           "but weight_block_size [64, 64] and model.layers.0.mlp.down_proj.weight [160, 200] make "
                           "[3, 4] (the scales were made with weight_block_size [128, 128]"),
    "an unknown fmt": (_config(lambda q: q.update(fmt="e5m2")), "quantization_config.fmt: FP8 format 'e5m2' is not "
                       "supported (supported: e4m3, float8_e4m3fn)"),
    "an unknown scale_fmt": (_config(lambda q: q.update(scale_fmt="e8m0x")), "scale format 'e8m0x' is not supported"),
    "an adapter on a weight of a format without a codec": (
        _config(lambda q: q.update(quant_method="gptq")), "targets model.layers.0.mlp.down_proj.weight, which the base "
        "stores quantized by gptq (model.layers.0.mlp.down_proj.weight), a format lora-merge has no codec for"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_quantized_bases_are_refused_with_one_line_and_nothing_written(fp8, tmp_path, capsys, case):
    checkpoint, _, adapter = fp8
    base = shutil.copytree(checkpoint.path, tmp_path / "base")
    damage, message = BAD[case]
    damage(str(base))
    code = main(["merge", "--base", str(base), "--adapter", adapter, "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
