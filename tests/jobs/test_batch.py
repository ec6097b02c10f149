"""`lora-merge batch`: several merged models from one read of the base, through the command, on the
two-node Ray cluster and the S3 server; and a batch's bad input, refused before anything is written."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from jobs.progress import size_text
from merge_core.names import INDEX_NAME, MANIFEST_NAME
from tests.conftest import BUCKET, download, open_uploads, upload_dir
from tests.jobs.conftest import cli
from tests.reference import assert_bit_identical, load_checkpoint, make_adapter, peft_merged


@pytest.fixture(scope="module")
def two_more(models, tmp_path_factory):
    """Two more adapters of the session's base, of other ranks and targets, and PEFT's merge of each."""
    root = tmp_path_factory.mktemp("batch")
    adapters = [make_adapter(str(root / "b"), "qwen2", seed=5, r=2, lora_alpha=4),
                make_adapter(str(root / "c"), "qwen2", seed=6, r=4, target_modules=["v_proj", "up_proj"])]
    return [(a, peft_merged(models.base, a, str(root / f"peft-{i}"), "qwen2")) for i, a in enumerate(adapters)]


def test_three_adapters_into_three_s3_outputs_reading_each_base_shard_once(s3, models, two_more, ray_session,
                                                                          tmp_path):
    cluster, _ = ray_session
    base = upload_dir(s3, models.base, "batch/base")
    pairs = [(models.adapter, models.reference), *two_more]
    adapters = [upload_dir(s3, a, f"batch/adapter-{i}") for i, (a, _) in enumerate(pairs)]
    outs = [f"s3://{BUCKET}/batch/out-{i}" for i in range(3)]
    groups = [arg for out, adapter in zip(outs, adapters) for arg in ("--output", out, "--adapter", adapter)]
    run = cli("batch", "--base", base, "--ray-address", cluster.address, *groups)
    assert run.returncode == 0, run.stderr

    shards = json.load(open(os.path.join(models.base, INDEX_NAME)))["weight_map"].values()
    sizes = {name: os.path.getsize(os.path.join(models.base, name)) for name in set(shards)}
    for i, (out, (_, reference)) in enumerate(zip(outs, pairs)):
        local = download(s3, out.split(f"{BUCKET}/")[1], tmp_path / f"out-{i}")
        assert_bit_identical(load_checkpoint(local), reference)
        recorded = json.load(open(os.path.join(local, MANIFEST_NAME)))["output"]["shards"]
        # counted by each task where the S3 server's bytes arrived: every shard once, for the three
        assert {s["name"]: (s["base_bytes_read"], s["outputs"]) for s in recorded} == {
            n: (size, 3) for n, size in sizes.items()}
        assert open_uploads(s3, out.split(f"{BUCKET}/")[1]) == []
    total = size_text(sum(sizes.values()))
    assert f"| read      | {total} from the base ({total}: each shard once, {len(sizes)} tasks) for 3" in run.stdout

    checked = cli("verify", "--base", base, "--adapter", adapters[1], "--merged", outs[1])
    assert checked.returncode == 0 and "no problems" in checked.stdout, checked.stderr
    shown = cli("report", outs[2])
    assert shown.returncode == 0 and adapters[2] in shown.stdout
    again = cli("batch", "--base", base, *groups)
    assert again.returncode == 0 and again.stdout.count("already complete") == 3, again.stderr


def test_a_bad_output_fails_alone_and_the_batch_exits_with_its_code(models, ray_session, tmp_path):
    cluster, _ = ray_session
    bad = tmp_path / "bad-adapter"
    shutil.copytree(models.adapter, bad)
    (bad / "adapter_config.json").write_text("{}")
    good, failed = tmp_path / "good", tmp_path / "failed"
    run = cli("batch", "--base", models.base, "--ray-address", cluster.address, "--output", str(good), "--adapter",
              models.adapter, "--output", str(failed), "--adapter", str(bad))
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {failed}: {bad}/adapter_config.json: is not a PEFT adapter config (no peft_type) "
                      "(regenerate it with PEFT's save_pretrained)"]
    shards = len(set(json.load(open(os.path.join(models.base, INDEX_NAME)))["weight_map"].values()))
    assert f"{good}: {shards} shards" in run.stdout and f"{failed}: FAILED" in run.stdout
    assert_bit_identical(load_checkpoint(str(good)), models.reference)
    assert not failed.exists()


BAD = {
    "an output listed twice": (lambda t, m: ["--output", t["out"], "--adapter", m.adapter,
                                             "--output", t["out"] + "/", "--adapter", m.adapter],
                               "is listed twice in the batch"),
    "two outputs at one URI": (lambda t, m: ["--output", t["out"], "--adapter", m.adapter,
                                             "--output", t["out"], "--adapter", m.adapter, "--weight", "0.5"],
                               "two outputs of the batch are at one URI"),
    "an output inside the base": (lambda t, m: ["--output", t["inside"], "--adapter", m.adapter],
                                  "lies inside the base"),
    "an output holding an adapter": (lambda t, m: ["--output", t["out"], "--adapter", t["adapter"],
                                                   "--output", t["parent"], "--adapter", m.adapter],
                                     "holds an adapter the batch reads"),
    "an adapter before any output": (lambda t, m: ["--adapter", m.adapter, "--output", t["out"]],
                                     "--adapter: belongs to one output"),
    "a job's option among an output's": (lambda t, m: ["--output", t["out"], "--adapter", m.adapter,
                                                       "--device", "cpu"], "--device: is an option of the whole batch"),
    "an output without adapters": (lambda t, m: ["--output", t["out"]], "no adapter given for this output"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_batch_is_refused_with_one_line_and_nothing_written(models, tmp_path, case):
    base = tmp_path / "base"
    shutil.copytree(models.base, base)
    shutil.copytree(models.adapter, tmp_path / "parent" / "adapter")
    places = {"out": str(tmp_path / "out"), "inside": str(base / "merged"), "parent": str(tmp_path / "parent"),
              "adapter": str(tmp_path / "parent" / "adapter")}
    before = sorted(p for p in tmp_path.rglob("*"))
    groups, expected = BAD[case]
    run = cli("batch", "--base", str(base), *groups(places, models))
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert expected in lines[0] and lines[0].endswith(")")
    assert sorted(p for p in tmp_path.rglob("*")) == before, "nothing written"


def test_the_plan_of_a_batch_reads_the_base_once_and_writes_each_output(models, two_more, tmp_path):
    adapters = [models.adapter, *(a for a, _ in two_more)]
    groups = [arg for i, a in enumerate(adapters) for arg in ("--output", str(tmp_path / f"out-{i}"), "--adapter", a)]
    run = cli("batch", "--base", models.base, "--plan", "--json", *groups)
    assert run.returncode == 0, run.stderr
    plan = json.loads(run.stdout)
    alone = [json.loads(cli("plan", "--base", models.base, "--adapter", a, "--json").stdout) for a in adapters]
    assert plan["separate_read_bytes"] == sum(p["read_bytes"] for p in alone)
    assert plan["read_bytes"] == plan["base_bytes"] + sum(p["read_bytes"] - plan["base_bytes"] for p in alone)
    assert plan["write_bytes"] == sum(p["write_bytes"] for p in alone)
    assert [o["fused_tensors"] for o in plan["outputs"]] == [p["fused_tensors"] for p in alone]
    text = cli("batch", "--base", models.base, "--plan", *groups).stdout
    assert text.startswith(f"base {models.base}: ") and "read once for 3 outputs (3 separate merges would read" in text
    assert not list(tmp_path.iterdir()), "a plan writes nothing"
