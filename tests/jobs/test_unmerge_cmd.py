"""`lora-merge unmerge` and the guard against merging an adapter twice, through the command line."""

from __future__ import annotations

import json
import os

import pytest

from merge_core.names import MANIFEST_NAME
from tests.conftest import BUCKET, upload_dir
from tests.jobs.conftest import cli
from tests.merge_core.worker.test_unmerge import peft_unmerged
from tests.reference import assert_bit_identical, load_checkpoint, make_adapter, model_class


@pytest.fixture(scope="module")
def merged(models, ray_session, tmp_path_factory):
    """The session's base merged with its adapter by lora-merge."""
    cluster, _ = ray_session
    out = str(tmp_path_factory.mktemp("merged") / "out")
    run = cli("merge", "--base", models.base, "--adapter", models.adapter, "--output", out,
                  "--ray-address", cluster.address)
    assert run.returncode == 0, run.stderr
    return out


def test_unmerge_equals_peft_and_reports_what_came_back(models, merged, ray_session, tmp_path):
    cluster, _ = ray_session
    out, report = str(tmp_path / "unmerged"), str(tmp_path / "report.json")
    run = cli("unmerge", "--merged", merged, "--adapter", models.adapter, "--output", out,
                  "--ray-address", cluster.address, "--report", report)
    assert run.returncode == 0, run.stderr
    reference = peft_unmerged((model_class("qwen2")[1], None), merged, [models.adapter], str(tmp_path / "peft"),
                              dtype=__import__("torch").bfloat16)
    assert_bit_identical(load_checkpoint(out), reference)

    manifest = json.load(open(os.path.join(out, MANIFEST_NAME)))
    assert manifest["arithmetic"]["operation"] == "unmerge"
    assert manifest["lineage"]["base"]["uri"] == os.path.realpath(models.base), "the merge it undid, whole"
    recovery = manifest["recovery"]
    assert recovery["original"] == os.path.realpath(models.base)  # found through the merged model's manifest
    assert 0 < recovery["elements_identical"] < recovery["elements"], "most bits come back, not all"
    assert recovery["max_ulps"] >= 1 and recovery["tensors_identical"] < recovery["tensors"]
    assert "came back bit for bit" in run.stdout

    verified = cli("verify", "--base", merged, "--adapter", models.adapter, "--merged", out, "--unmerge",
                       "--ray-address", cluster.address)
    assert verified.returncode == 0, verified.stderr
    planned = cli("plan", "--base", merged, "--adapter", models.adapter, "--unmerge")
    assert planned.returncode == 0 and "unmerges" in planned.stdout, planned.stdout + planned.stderr


def test_an_adapter_is_not_merged_twice_unless_asked(models, merged, ray_session, tmp_path):
    cluster, _ = ray_session
    again = cli("merge", "--base", merged, "--adapter", models.adapter, "--output", str(tmp_path / "twice"))
    assert again.returncode == 2
    assert again.stderr.strip().startswith(f"error: {models.adapter}: is already merged into ")
    assert "--allow-remerge" in again.stderr and not (tmp_path / "twice").exists()
    allowed = cli("merge", "--base", merged, "--adapter", models.adapter, "--output", str(tmp_path / "twice"),
                      "--allow-remerge", "--ray-address", cluster.address)
    assert allowed.returncode == 0, allowed.stderr


def test_the_guard_reads_the_manifest_from_s3_too(s3, models, merged, tmp_path):
    merged_uri = upload_dir(s3, merged, "guard/merged")
    adapter_uri = upload_dir(s3, models.adapter, "guard/adapter")  # the same weights under another name
    again = cli("merge", "--base", merged_uri, "--adapter", adapter_uri, "--output", f"s3://{BUCKET}/guard/out")
    assert again.returncode == 2 and f"error: {adapter_uri}: is already merged into {merged_uri}" in again.stderr


def test_unmerging_an_adapter_the_model_never_held_warns_or_with_strict_is_refused(models, merged, ray_session,
                                                                                   tmp_path):
    cluster, _ = ray_session
    other = make_adapter(str(tmp_path / "other"), "qwen2", seed=7, r=4, lora_alpha=8)
    refused = cli("unmerge", "--merged", merged, "--adapter", other, "--output", str(tmp_path / "a"), "--strict")
    assert refused.returncode == 2 and "is not merged into" in refused.stderr and "--strict" in refused.stderr
    warned = cli("unmerge", "--merged", merged, "--adapter", other, "--output", str(tmp_path / "b"),
                     "--ray-address", cluster.address)
    assert warned.returncode == 0, warned.stderr
    assert "is not merged into" in warned.stderr
