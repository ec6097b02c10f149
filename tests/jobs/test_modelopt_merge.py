"""ModelOpt bases through the `lora-merge` command: NVFP4 (hf_quant_config.json beside config.json) with fused
siblings S3 to S3 with fresh scales, then verify (the scales taken from the manifest), plan and unmerge; and bad
ModelOpt input refused with one line naming the tensor or key, nothing written."""

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
from tests.jobs.conftest import cli
from tests.jobs.test_bad_input import shard_of
from tests.jobs.test_ct_merge import _adapter, _replace
from tests.modelopt_models import save_llama
from tests.quantized_models import decode_checkpoint

HF_QUANT_CONFIG = "hf_quant_config.json"
Q = "model.layers.0.self_attn.q_proj"


def test_nvfp4_s3_to_s3_with_fresh_scales_then_verify_plan_and_unmerge(s3, ray_session, tmp_path):
    cluster, _ = ray_session
    checkpoint = save_llama(str(tmp_path / "base"), "NVFP4")
    adapter = _adapter(checkpoint, tmp_path, "adapter", target_modules=["q_proj", "gate_proj"])
    base_uri, adapter_uri = upload_dir(s3, checkpoint.path, "mo/base"), upload_dir(s3, adapter, "mo/adapter")
    out = f"s3://{BUCKET}/mo/out"
    ray = ["--ray-address", cluster.address]
    run = cli("merge", "--base", base_uri, "--adapter", adapter_uri, "--output", out, "--scales", "fresh", *ray)
    assert run.returncode == 0, run.stderr
    assert "adapter kept" in run.stdout
    keys = list_keys(s3, "mo/out")
    assert INDEX_NAME in keys and HF_QUANT_CONFIG in keys and open_uploads(s3, "mo/out") == []
    manifest = json.loads(s3.client().get_object(Bucket=BUCKET, Key="mo/out/merge_manifest.json")["Body"].read())
    assert manifest["requantization"]["scales"] == "fresh"
    assert [f"model.layers.0.self_attn.{p}_proj.weight" for p in "kqv"] in manifest["requantization"]["tied"]
    verified = cli("verify", "--base", base_uri, "--adapter", adapter_uri, "--merged", out, *ray)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    planned = cli("plan", "--base", base_uri, "--adapter", adapter_uri, "--json", "--scales", "fresh")
    assert planned.returncode == 0, planned.stderr
    shown = json.loads(planned.stdout)
    assert shown["scales"] == "fresh" and "modelopt NVFP4" in shown["quantization"]
    requantized = {t for shard in shown["shards"] for t in shard["requantized"]}
    assert "model.layers.0.self_attn.k_proj.weight" in requantized  # a sibling merged with q_proj
    back = str(tmp_path / "unmerged")
    undone = cli("unmerge", "--merged", out, "--adapter", adapter_uri, "--output", back, *ray)
    assert undone.returncode == 0, undone.stderr
    assert os.path.exists(os.path.join(back, HF_QUANT_CONFIG))
    merged_local = str(tmp_path / "merged")
    assert cli("merge", "--base", base_uri, "--adapter", adapter_uri, "--output", merged_local, "--scales", "fresh",
               *ray).returncode == 0
    base, merged, unmerged = (decode_checkpoint(p) for p in (checkpoint.path, merged_local, back))
    q = f"{Q}.weight"
    assert (unmerged[q] - base[q]).norm() < 0.5 * (merged[q] - base[q]).norm()  # the update taken back out


def _drop(base: str, name: str) -> None:
    """The tensor gone from its shard and from the index, as a checkpoint exported without it stores it."""
    path = shard_of(base, name)
    tensors = load_file(path)
    del tensors[name]
    save_file(tensors, path, metadata={"format": "pt"})
    index_path = os.path.join(base, INDEX_NAME)
    index = json.load(open(index_path))
    del index["weight_map"][name]
    json.dump(index, open(index_path, "w"))


def _quant_algo(algo: str):
    def apply(base: str) -> None:
        path = os.path.join(base, HF_QUANT_CONFIG)
        config = json.load(open(path))
        config["quantization"]["quant_algo"] = algo
        json.dump(config, open(path, "w"))
    return apply


BAD = {
    "a missing weight_scale_2": (lambda b: _drop(b, f"{Q}.weight_scale_2"),
                                 f"module {Q}: has no {Q}.weight_scale_2, which NVFP4 weights need"),
    "a scale of the wrong shape": (
        lambda b: _replace(b, f"{Q}.weight_scale", torch.ones(128, 1).to(torch.float8_e4m3fn)),
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
        _adapter(save_llama(str(root / "base"), "NVFP4"), root, "adapter", target_modules=["q_proj"])
    base = shutil.copytree(root / "base", tmp_path / "base")
    damage, message = BAD[case]
    damage(str(base))
    capsys.readouterr()  # what building the inputs printed
    code = main(["merge", "--base", str(base), "--adapter", str(root / "adapter"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
