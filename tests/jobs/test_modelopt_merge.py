"""ModelOpt bases through the `lora-merge` command: NVFP4 (hf_quant_config.json beside config.json) with fused
siblings S3 to S3 with fresh scales, then verify (the scales taken from the manifest), plan and unmerge; and bad
ModelOpt input refused with one line naming the tensor or key, nothing written."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from jobs.cli import main
from tests.jobs.quantized_jobs import adapter_on, drop_tensor, fresh_round_trip, replace_tensor
from tests.modelopt_models import save_llama

HF_QUANT_CONFIG = "hf_quant_config.json"
Q = "model.layers.0.self_attn.q_proj"


def test_nvfp4_s3_to_s3_with_fresh_scales_then_verify_plan_and_unmerge(s3, ray_session, tmp_path):
    cluster, _ = ray_session
    checkpoint = save_llama(str(tmp_path / "base"), "NVFP4")
    adapter = adapter_on(checkpoint, tmp_path, "adapter", target_modules=["q_proj", "gate_proj"])
    keys, back = fresh_round_trip(s3, cluster, checkpoint, adapter, tmp_path, "mo", "modelopt NVFP4")
    assert HF_QUANT_CONFIG in keys and os.path.exists(os.path.join(back, HF_QUANT_CONFIG))


def _quant_algo(algo: str):
    def apply(base: str) -> None:
        path = os.path.join(base, HF_QUANT_CONFIG)
        config = json.load(open(path))
        config["quantization"]["quant_algo"] = algo
        json.dump(config, open(path, "w"))
    return apply


BAD = {
    "a missing weight_scale_2": (lambda b: drop_tensor(b, f"{Q}.weight_scale_2"),
                                 f"module {Q}: has no {Q}.weight_scale_2, which NVFP4 weights need"),
    "a scale of the wrong shape": (
        lambda b: replace_tensor(b, f"{Q}.weight_scale", torch.ones(128, 1).to(torch.float8_e4m3fn)),
        f"tensor {Q}.weight_scale: is F8_E4M3[128, 1], but NVFP4 and {Q}.weight [128, 64] make F8_E4M3[128, 8]"),
    "an unknown quant_algo": (_quant_algo("W4A8_AWQ"), "quantization.quant_algo: 'W4A8_AWQ' is not a quant_algo "
                              "lora-merge can keep (supported: NVFP4, W4A16_NVFP4, FP8, FP8_PER_CHANNEL_PER_TOKEN, "
                              "FP8_PB_WO, MXFP8, MIXED_PRECISION)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_modelopt_input_is_refused_with_one_line_and_nothing_written(tmp_path_factory, tmp_path, capsys, case):
    root = tmp_path_factory.getbasetemp() / "mo-bad"
    if not root.exists():  # one base and adapter for every case
        root.mkdir()
        adapter_on(save_llama(str(root / "base"), "NVFP4"), root, "adapter", target_modules=["q_proj"])
    base = shutil.copytree(root / "base", tmp_path / "base")
    damage, message = BAD[case]
    damage(str(base))
    capsys.readouterr()  # what building the inputs printed
    code = main(["merge", "--base", str(base), "--adapter", str(root / "adapter"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
