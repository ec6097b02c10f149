"""A newcomer's first hour (issue 28): each mistake seen when a new user followed the README gets
one clear line through the real command, and the figures and help they read are right."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from jobs.cli import COMMAND_OPTIONS, build_parser
from merge_core.io.local import output_error
from tests.jobs.conftest import cli, run_cli
from tests.jobs.test_cli_errors import one_error_line
from tests.reference import assert_bit_identical, load_checkpoint

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def merge_args(models, out) -> list[str]:
    return ["merge", "--base", models.base, "--adapter", models.adapter, "--output", str(out)]


# ---------------------------------------------------------------- inputs in the wrong place

def test_a_file_given_for_a_folder_and_swapped_inputs_are_named(models, tmp_path):
    out = tmp_path / "out"
    shard = sorted(n for n in os.listdir(models.base) if n.endswith(".safetensors"))[0]
    line = one_error_line(cli("merge", "--base", f"{models.base}/{shard}", "--adapter", models.adapter,
                              "--output", str(out)))
    assert line == (f"error: {models.base}/{shard}: is the file {shard}, not the folder of a checkpoint (pass the "
                    f"folder that holds it: --base {models.base})")
    line = one_error_line(cli("merge", "--base", models.adapter, "--adapter", models.base, "--output", str(out)))
    assert line == (f"error: {models.adapter}: holds a PEFT adapter (adapter_config.json), not a model (were --base "
                    "and --adapter swapped? pass the base model as --base and this folder as --adapter)")
    line = one_error_line(cli("merge", "--base", models.base, "--adapter", models.base, "--output", str(out)))
    assert line == (f"error: {models.base}: holds a model and no adapter_config.json: it is not a PEFT adapter (were "
                    "--base and --adapter swapped? pass this folder as --base and the adapter as --adapter)")
    line = one_error_line(cli("merge", "--base", models.base, "--adapter", f"{models.adapter}/adapter_config.json",
                              "--output", str(out)))
    assert line == (f"error: {models.adapter}/adapter_config.json: is the file adapter_config.json, not an adapter "
                    f"folder (pass the folder that holds it: --adapter {models.adapter})")
    assert not out.exists()


# ---------------------------------------------------------------- the output's own errors

def test_os_errors_at_the_output_are_one_line_and_exit_2(models, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    line = one_error_line(cli(*merge_args(models, blocker / "merged")))
    assert line == (f"error: {blocker}/merged: lies inside a file, not a folder (choose an --output whose parents "
                    "are folders)")
    line = one_error_line(cli(*merge_args(models, blocker)))
    assert line == f"error: {blocker}: is a file, not a folder (choose a folder as --output)"
    assert sorted(os.listdir(tmp_path)) == ["a-file"], "nothing written, no temp file left"


@pytest.mark.parametrize("code, what", [
    (errno.EROFS, "is on a read-only file system (choose a writable --output)"),
    (errno.EACCES, "is not writable: permission denied (choose a folder you may write to as --output, or fix its "
                   "permissions)"),
    (errno.ENOSPC, "ran out of space on its device (free space there, then run the same command with --resume)"),
])
def test_each_os_error_at_the_output_reads_as_the_users_mistake(code, what):
    """The table the local storage translates with (a read-only or full file system cannot be made
    here without privileges the suite does not assume)."""
    error = output_error(OSError(code, os.strerror(code), "/models/out/.model-00001.safetensors.1a2b.partial"),
                         "/models/out/model-00001.safetensors")
    assert str(error) == f"/models/out/model-00001.safetensors: {what}"


# ---------------------------------------------------------------- job specs and Ray Jobs

def test_job_spec_paths_are_relative_to_the_spec_and_never_in_a_ray_working_dir(models, ray_session, tmp_path,
                                                                               monkeypatch):
    specs = tmp_path / "specs"
    specs.mkdir()
    spec = specs / "job.yaml"
    spec.write_text(yaml.safe_dump({"base": os.path.relpath(models.base, specs),
                                    "adapters": [os.path.relpath(models.adapter, specs)], "output": "merged"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = cli("merge", "--config", "../specs/job.yaml")
    assert run.returncode == 0, run.stderr
    assert_bit_identical(load_checkpoint(str(specs / "merged")), models.reference)
    assert os.listdir(elsewhere) == []

    working_dir = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    working_dir.mkdir(parents=True)
    monkeypatch.chdir(working_dir)
    line = one_error_line(cli(*merge_args(models, "merged")))
    assert line == (f"error: {working_dir}/merged: lies in the temporary working directory of this Ray job, which "
                    "Ray deletes (give --output as an absolute path outside it (on storage every node sees) or an "
                    "s3:// URI)")


@pytest.mark.processes
def test_a_cluster_address_nothing_answers_at_is_one_line_within_seconds(models, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    run = run_cli(*merge_args(models, tmp_path / "out"), "--ray-address", f"127.0.0.1:{port}")
    assert one_error_line(run) == (f"error: --ray-address 127.0.0.1:{port}: no Ray cluster answers at 127.0.0.1:{port} "
                                   "within 10 s (start the cluster (ray start --head), pass the address of a running "
                                   "one, or leave --ray-address out to start a local Ray for this job)")
    stale = run_cli(*merge_args(models, tmp_path / "out"), "--ray-address", "auto",
                    env=dict(os.environ, RAY_ADDRESS=f"127.0.0.1:{port}"))
    assert one_error_line(stale).startswith(f"error: --ray-address auto: no Ray cluster answers at 127.0.0.1:{port} "
                                            "(where auto leads) within 10 s")
    assert time.monotonic() - started < 60 and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- help, README, JSON

def test_help_is_written_for_each_command():
    raw = {name: sub.format_help() for name, sub in _subparsers().items()}
    required = raw["merge"].split("required (here, or in the --config file):")[1].split("\n\n")[0]
    helps = {name: " ".join(text.split()) for name, text in raw.items()}  # unwrapped
    assert all(flag in required for flag in ("--base URI", "--adapter URI", "--output URI"))
    assert "--part-size-mb" not in helps["verify"] + helps["plan"] and "--part-size-mb" in helps["unmerge"]
    assert "repeat to merge several" not in helps["unmerge"] and "take out several" in helps["unmerge"]
    assert "where to write the merged checkpoint" not in helps["unmerge"]
    assert "--resume" not in helps["plan"].split("exit codes:")[1] and "4 it differs" in helps["verify"]
    assert "default: as the merged model's manifest records" in helps["verify"]
    assert len({h.split("exit codes:")[1] for h in helps.values()}) == 5  # merge and unmerge share theirs
    outputs = raw["batch"].split("each output's own")[1].split("\n\n")[0]
    assert all(flag in outputs for flag in ("--output URI", "--adapter URI", "--combine", "--dequantize", "--resume"))
    assert "--device" not in outputs and "highest of their codes" in helps["batch"]


def test_the_readme_usage_lists_every_option_of_every_command():
    usage = open(README).read().split("## Usage\n", 1)[1].split("```", 2)[1]
    for name, sub in _subparsers().items():
        block = usage.split(f"lora-merge {name}", 1)[1].split("\nlora-merge ", 1)[0]
        flags = {a for action in sub._actions for a in action.option_strings if a.startswith("--") and a != "--help"}
        missing = sorted(f for f in flags if not re.search(re.escape(f) + r"\b", block))
        assert not missing, f"the README's usage of {name} leaves out {missing}"


def _subparsers() -> dict:
    action = next(a for a in build_parser()._actions if a.dest == "command")
    return {name: action.choices[name] for name in COMMAND_OPTIONS}


def test_json_logs_are_json_on_every_line_with_the_summary(models, ray_session, tmp_path):
    run = cli(*merge_args(models, tmp_path / "out"), "--log-format", "json")
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    (summary,) = [e for e in lines if e.get("event") == "summary"]
    assert summary["fused_tensors"] == 14 and summary["output"] == str(tmp_path / "out")
    assert summary["adapters"] == [{"uri": models.adapter, "weight": 1.0}]
    planned = cli("plan", "--base", models.base, "--adapter", models.adapter, "--log-format", "json")
    (line,) = planned.stdout.splitlines()
    assert json.loads(line)["event"] == "plan" and json.loads(line)["fused_tensors"] == 14


# ---------------------------------------------------------------- surprises and figures

def test_weight_0_and_an_adapter_of_another_model_are_warned_about(models, ray_session, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(models.adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "org/other-7b"}))
    run = cli("merge", "--base", models.base, "--adapter", str(adapter), "--weight", "0", "--output",
              str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr
    assert (f"{adapter} has weight 0, so it changes nothing: drop it, or give it another --weight"
            in run.stderr.splitlines())
    assert (f"{adapter} was trained on 'org/other-7b' (its adapter_config.json), and the base is {models.base}: "
            "merge it only into that model's weights" in run.stderr.splitlines())


def test_the_summary_names_the_adapters_and_sizes_small_merges_in_mb(models, ray_session, tmp_path):
    run = cli(*merge_args(models, tmp_path / "out"))
    assert run.returncode == 0, run.stderr
    table = {row.split("|")[1].strip(): row.split("|")[2].strip() for row in run.stdout.splitlines()
             if row.startswith("|")}
    assert table["adapters"] == f"{models.adapter} (weight 1)"
    assert re.fullmatch(r"0\.\d+ MB", table["read"]) and re.fullmatch(r"0\.\d+ MB", table["written"])
    assert re.fullmatch(r"[12], device cpu", table["nodes"]) and "MB/s written" in table["wall time"]
    assert re.search(r"\[\d/5\] model-\d{5}-of-00005\.safetensors: 0\.\d+ MB, 1 tensor fused,", run.stderr)
    planned = cli("plan", "--base", models.base, "--adapter", models.adapter, "--json")
    memory = [s["resources"]["memory"] for s in json.loads(planned.stdout)["shards"]]
    assert max(memory) < 0.45e9, "a task of a few kB asks for the worker's own memory, not for 128 MB windows"


# ---------------------------------------------------------------- the local S3 helper

@pytest.mark.processes
def test_the_s3_helper_runs_from_any_folder_and_refuses_a_second_start(tmp_path):
    data = tmp_path / "s3-data"
    command = [sys.executable, "-m", "lora_merge.s3_server"]
    started = subprocess.run([*command, "start", "--dir", str(data), "--bucket", "models"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stderr
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", started.stdout, re.M))
        assert set(exports) == {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"}
        assert f"settings kept in {data}/server.json" in started.stdout
        assert oct(os.stat(data / "server.json").st_mode & 0o777) == "0o600"
        again = subprocess.run([*command, "start", "--dir", str(data)], cwd=tmp_path, capture_output=True, text=True,
                               timeout=60)
        assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1
        assert again.stderr.startswith(f"error: a server already runs on {data} (pid ")
    finally:
        stopped = subprocess.run([*command, "stop", "--dir", str(data)], cwd=tmp_path, capture_output=True, text=True,
                                 timeout=60)
    assert stopped.returncode == 0, stopped.stderr
