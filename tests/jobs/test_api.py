"""The Python API (`import lora_merge`): a merge on a real Ray equal to PEFT's, typed results,
progress events, and bad input raising the very error the command prints."""

from __future__ import annotations

import json
import os

import pytest

import lora_merge
from merge_core.names import INDEX_NAME
from tests.jobs.conftest import cli
from tests.reference import assert_bit_identical, load_checkpoint


def test_merge_verify_plan_and_report_from_python_on_a_real_ray(models, ray_session, tmp_path):
    out = str(tmp_path / "merged")
    events: list[lora_merge.ProgressEvent] = []
    summary = lora_merge.merge(models.base, models.adapter, out, device="cpu", progress=events.append)

    assert isinstance(summary, lora_merge.MergeSummary)
    assert_bit_identical(load_checkpoint(out), models.reference)
    assert summary.output == out and summary.fused_tensors == 14 and summary.validated
    assert summary.shards == len(set(json.load(open(os.path.join(out, INDEX_NAME)))["weight_map"].values()))
    assert summary.manifest["adapters"][0]["uri"] == models.adapter
    assert [e.kind for e in events] == ["shard_done"] * summary.shards
    assert [e.shards_done for e in events] == list(range(1, summary.shards + 1))
    assert events[-1].bytes_done == events[-1].bytes_total == summary.bytes_written and events[-1].fraction == 1.0

    checked = lora_merge.verify(models.base, [models.adapter], out)
    assert checked.ok and checked.problems == [] and checked.tensors_checked == summary.tensors
    planned = lora_merge.plan(models.base, models.adapter)
    assert (planned.shards, planned.fused_tensors, planned.operation) == (summary.shards, 14, "merge")
    assert planned.text.startswith(f"base {models.base}: {summary.shards} shards, 14 tensors to fuse")
    shown = lora_merge.report(out)
    assert f", 14 of {summary.tensors} tensors fused" in shown.text.splitlines()[0] and shown.written == ()
    assert len([t for t in shown.view.tensors if t.fused]) == 14


def test_verify_returns_its_findings_instead_of_exiting(models, ray_session, tmp_path):
    """A merged model whose bytes were changed: the API returns each problem; the command exits 4."""
    out = str(tmp_path / "merged")
    lora_merge.merge(models.base, models.adapter, out)
    name = json.load(open(os.path.join(out, INDEX_NAME)))["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    with open(os.path.join(out, name), "r+b") as f:
        f.seek(-3, os.SEEK_END)
        f.write(b"\x7f\x7f\x7f")
    checked = lora_merge.verify(models.base, models.adapter, out)
    assert not checked.ok and any(name in p and "sha256" in p for p in checked.problems), checked.problems
    run = cli("verify", "--base", models.base, "--adapter", models.adapter, "--merged", out)
    assert run.returncode == 4 and "\nerror: validation failed: " in run.stderr


def test_bad_input_raises_the_error_the_command_prints(models, tmp_path):
    missing = str(tmp_path / "no-such-base")
    with pytest.raises(lora_merge.InputError) as raised:
        lora_merge.merge(missing, models.adapter, str(tmp_path / "out"))
    run = cli("merge", "--base", missing, "--adapter", models.adapter, "--output", str(tmp_path / "out"))
    assert run.returncode == 2 and run.stderr.strip() == f"error: {raised.value}"
    assert raised.value.subject.startswith(missing) and not os.path.exists(tmp_path / "out")

    with pytest.raises(lora_merge.InputError) as raised:
        lora_merge.merge(models.base, models.adapter, str(tmp_path / "out"), device="tpu")
    assert str(raised.value).startswith("--device: unknown device 'tpu'")
    with pytest.raises(TypeError, match="unknown option"):
        lora_merge.merge(models.base, models.adapter, str(tmp_path / "out"), overwite=True)

    with pytest.raises(TypeError, match="unknown output option.s. adapter;"):
        lora_merge.batch(models.base, [{"output": str(tmp_path / "out"), "adapter": models.adapter}])
    with pytest.raises(TypeError, match="adapters: an output's own"):
        lora_merge.batch(models.base, [{"output": str(tmp_path / "out")}], adapters=[models.adapter])
    with pytest.raises(lora_merge.InputError) as raised:  # a bad batch: nothing written
        lora_merge.batch(models.base, [{"output": str(tmp_path / "out"), "adapters": models.adapter}] * 2)
    assert "is listed twice in the batch" in str(raised.value) and not os.path.exists(tmp_path / "out")
