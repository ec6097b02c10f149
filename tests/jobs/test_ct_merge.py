"""compressed-tensors bases through the `lora-merge` command: NVFP4 with fused siblings S3 to S3 with fresh
scales, then verify (the scales taken from the manifest), plan, report and unmerge; and bad compressed-
tensors input refused with one line naming the tensor or key, nothing written."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from jobs.cli import main
from merge_core.names import INDEX_NAME
from tests.conftest import BUCKET, list_keys, open_uploads, upload_dir
from tests.ct_models import save_preset
from tests.jobs.conftest import cli
from tests.jobs.test_bad_input import shard_of
from tests.jobs.test_quantized_merge import _config
from tests.quantized_merges import exact_base
from tests.quantized_models import decode_checkpoint
from tests.variant_reference import build_adapter


def _adapter(checkpoint, root, name: str, resize: int | None = None, **lora) -> str:
    from peft import LoraConfig
    from transformers import LlamaForCausalLM
    twin = exact_base(checkpoint, str(root / f"{name}-twin"))
    return build_adapter((LlamaForCausalLM, None), twin, str(root / name), LoraConfig(r=4, lora_alpha=8, **lora),
                         resize=resize)


def test_nvfp4_s3_to_s3_with_fresh_scales_then_verify_plan_report_and_unmerge(s3, ray_session, tmp_path):
    cluster, _ = ray_session
    checkpoint = save_preset(str(tmp_path / "base"), "NVFP4A16")
    adapter = _adapter(checkpoint, tmp_path, "adapter", target_modules=["q_proj", "gate_proj"])
    base_uri, adapter_uri = upload_dir(s3, checkpoint.path, "ct/base"), upload_dir(s3, adapter, "ct/adapter")
    out = f"s3://{BUCKET}/ct/out"
    ray = ["--ray-address", cluster.address]
    run = cli("merge", "--base", base_uri, "--adapter", adapter_uri, "--output", out, "--scales", "fresh",
              "--part-size-mb", "5", *ray)
    assert run.returncode == 0, run.stderr
    assert "adapter kept" in run.stdout
    assert INDEX_NAME in list_keys(s3, "ct/out") and open_uploads(s3, "ct/out") == []
    manifest = json.loads(s3.client().get_object(Bucket=BUCKET, Key="ct/out/merge_manifest.json")["Body"].read())
    tied = manifest["requantization"]
    assert tied["scales"] == "fresh"
    assert [f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "kqv" for i in (0,)] in tied["tied"]
    verified = cli("verify", "--base", base_uri, "--adapter", adapter_uri, "--merged", out, *ray)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    planned = cli("plan", "--base", base_uri, "--adapter", adapter_uri, "--json", "--scales", "fresh")
    assert planned.returncode == 0, planned.stderr
    shown = json.loads(planned.stdout)
    assert shown["scales"] == "fresh" and "nvfp4-pack-quantized" in shown["quantization"]
    requantized = {t for shard in shown["shards"] for t in shard["requantized"]}
    assert "model.layers.0.self_attn.k_proj.weight" in requantized  # a sibling merged with q_proj
    back = str(tmp_path / "unmerged")
    undone = cli("unmerge", "--merged", out, "--adapter", adapter_uri, "--output", back, *ray)
    assert undone.returncode == 0, undone.stderr
    assert json.load(open(os.path.join(back, "merge_manifest.json")))["requantization"]["scales"] == "fresh"
    merged_local = str(tmp_path / "merged")
    assert cli("merge", "--base", base_uri, "--adapter", adapter_uri, "--output", merged_local, "--scales", "fresh",
               *ray).returncode == 0
    base, merged, unmerged = (decode_checkpoint(p) for p in (checkpoint.path, merged_local, back))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (unmerged[q] - base[q]).norm() < 0.5 * (merged[q] - base[q]).norm()  # the update taken back out


def _replace(base: str, name: str, value: torch.Tensor) -> None:
    path = shard_of(base, name)
    tensors = load_file(path)
    tensors[name] = value
    save_file(tensors, path, metadata={"format": "pt"})


Q = "model.layers.0.self_attn.q_proj"
BAD = {
    "a scale of the wrong shape": (
        lambda b: _replace(b, f"{Q}.weight_scale", torch.ones(128, 1).to(torch.float8_e4m3fn)),
        f"tensor {Q}.weight_scale: is F8_E4M3[128, 1], but its weight's codes and config group make F8_E4M3[128, 8]"),
    "a global scale of the wrong dtype": (
        lambda b: _replace(b, f"{Q}.weight_global_scale", torch.ones(1, dtype=torch.bfloat16)),
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
        _adapter(checkpoint, root, "adapter", target_modules=["q_proj"])
        _adapter(checkpoint, root, "resizing", resize=128, target_modules=["q_proj"], modules_to_save=["lm_head"])
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
