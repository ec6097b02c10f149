"""compressed-tensors bases through the `lora-merge` command: NVFP4 with fused siblings S3 to S3 with fresh
scales, then verify (the scales taken from the manifest), plan, report and unmerge; and bad compressed-
tensors input refused with one line naming the tensor or key, nothing written."""

from __future__ import annotations

import shutil

import pytest
import torch

from jobs.cli import main
from tests.ct_models import save_preset
from tests.jobs.quantized_jobs import adapter_on, fresh_round_trip, replace_tensor
from tests.jobs.test_quantized_merge import _config


def test_nvfp4_s3_to_s3_with_fresh_scales_then_verify_plan_report_and_unmerge(s3, ray_session, tmp_path):
    cluster, _ = ray_session
    checkpoint = save_preset(str(tmp_path / "base"), "NVFP4A16")
    adapter = adapter_on(checkpoint, tmp_path, "adapter", target_modules=["q_proj", "gate_proj"])
    fresh_round_trip(s3, cluster, checkpoint, adapter, tmp_path, "ct", "nvfp4-pack-quantized", "--part-size-mb", "5")


Q = "model.layers.0.self_attn.q_proj"
BAD = {
    "a scale of the wrong shape": (
        lambda b: replace_tensor(b, f"{Q}.weight_scale", torch.ones(128, 1).to(torch.float8_e4m3fn)),
        f"tensor {Q}.weight_scale: is F8_E4M3[128, 1], but its weight's codes and config group make F8_E4M3[128, 8]"),
    "a global scale of the wrong dtype": (
        lambda b: replace_tensor(b, f"{Q}.weight_global_scale", torch.ones(1, dtype=torch.bfloat16)),
        f"tensor {Q}.weight_global_scale: is BF16[1], but its weight's codes and config group make F32[1]"),
    "a strategy the format cannot hold": (
        _config(lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="group")),
        "quantization_config.config_groups.group_0.weights.strategy: 'group': nvfp4-pack-quantized weights are"),
    "a group that names no stored tensor": (
        _config(lambda q: q["config_groups"].update(
            group_1=q["config_groups"]["group_0"] | {"targets": ["re:.*vis.*"]})),
        "quantization_config.config_groups.group_1: names no stored tensor"),
}


@pytest.mark.parametrize("case", [*BAD, "an adapter resizing a quantized head"])
def test_bad_compressed_tensors_input_is_refused_with_one_line_and_nothing_written(tmp_path_factory, tmp_path, capsys,
                                                                                   case):
    root = tmp_path_factory.getbasetemp() / "ct-bad"
    if not root.exists():  # one base (its lm_head quantized too) and two adapters for every case
        root.mkdir()
        checkpoint = save_preset(str(root / "base"), "NVFP4A16", ignore=())
        adapter_on(checkpoint, root, "adapter", target_modules=["q_proj"])
        adapter_on(checkpoint, root, "resizing", resize=128, target_modules=["q_proj"], modules_to_save=["lm_head"])
    base = shutil.copytree(root / "base", tmp_path / "base")
    adapter = str(root / "adapter")
    if case in BAD:
        damage, message = BAD[case]
        damage(str(base))
    else:
        adapter = str(root / "resizing")
        message = "resizes lm_head.weight, which the base stores quantized (ct_nvfp4)"
    capsys.readouterr()  # what building the inputs printed
    code = main(["merge", "--base", str(base), "--adapter", adapter, "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
