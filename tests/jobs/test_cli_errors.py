"""Bad input through the command: exit 2, one line naming the file and the fix, nothing written."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from jobs.scheduling import plan_lanes
from merge_core.errors import InputError
from tests.jobs.conftest import cli


def one_error_line(run) -> str:
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, run.stderr
    return lines[0]


def test_missing_base(models, tmp_path):
    out = tmp_path / "out"
    run = cli("merge", "--base", str(tmp_path / "nowhere"), "--adapter", models.adapter, "--output", str(out))
    assert one_error_line(run) == f"error: {tmp_path}/nowhere: does not exist or is empty (check the path given as --base)"
    assert not out.exists()


def test_adapter_config_not_json_with_and_without_debug(models, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(models.adapter, adapter)
    (adapter / "adapter_config.json").write_text("{")
    args = ("merge", "--base", models.base, "--adapter", str(adapter), "--output", str(tmp_path / "out"))
    line = one_error_line(cli(*args))
    assert line.startswith(f"error: {adapter}/adapter_config.json: not valid JSON")
    debug = cli(*args, "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    assert not (tmp_path / "out").exists()


def test_adapter_that_does_not_fit_the_base(models, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(models.adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"r": 16}))
    line = one_error_line(cli("merge", "--base", models.base, "--adapter", str(adapter),
                                  "--output", str(tmp_path / "out")))
    assert "tensors have rank 4 but the config gives 16 (r/rank_pattern)" in line


def test_leftover_partial_output_is_refused(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00001-of-00005.safetensors").write_bytes(b"partial")
    line = one_error_line(cli("merge", "--base", models.base, "--adapter", models.adapter, "--output", str(out)))
    assert "holds an unfinished merge (1 file) (pass --resume to finish it, --overwrite to start over" in line
    assert os.listdir(out) == ["model-00001-of-00005.safetensors"]


def test_usage_errors_are_exit_2_too(models):
    line = one_error_line(cli("merge", "--base", models.base))
    assert line == "error: --adapter: is required (pass --adapter, or set adapters in the --config file)"
    line = one_error_line(cli("verify", "--base", models.base))
    assert "the following arguments are required: --adapter, --merged" in line


def test_device_cuda_on_a_cluster_without_gpus_is_refused_up_front():
    nodes = [{"Alive": True, "NodeID": "a" * 56, "Resources": {"CPU": 4.0}}]
    with pytest.raises(InputError, match="--device cuda: the Ray cluster has no GPUs"):
        plan_lanes(nodes, "cuda")


def test_lanes_use_gpus_and_cpu_only_nodes():
    nodes = [{"Alive": True, "NodeID": "ab" * 28, "Resources": {"CPU": 2.0}},
             {"Alive": True, "NodeID": "cd" * 28, "Resources": {"CPU": 8.0, "GPU": 2.0}},
             {"Alive": False, "NodeID": "ef" * 28, "Resources": {"CPU": 8.0}}]
    # two tasks share each GPU: its fuse takes milliseconds, the rest of a task is host I/O
    assert [(lane.name, lane.slots) for lane in plan_lanes(nodes, "auto")] == [("gpu", 4), ("cpu@abababab", 2)]
    assert plan_lanes(nodes, "cuda")[0].options["num_gpus"] == 0.5
    assert [(lane.name, lane.slots) for lane in plan_lanes(nodes, "cpu")] == [("cpu", 10)]


def test_fewer_shards_than_cores_get_a_share_of_a_node_each():
    nodes = [{"Alive": True, "NodeID": "ab" * 28, "Resources": {"CPU": 16.0}}]
    assert [(lane.options["num_cpus"], lane.slots) for lane in plan_lanes(nodes, "cpu", None, tasks=3)] == [(5, 3)]
    assert [(lane.options["num_cpus"], lane.slots) for lane in plan_lanes(nodes, "cpu", None, tasks=40)] == [(1, 16)]
    assert [(lane.options["num_cpus"], lane.slots) for lane in plan_lanes(nodes, "cpu", 2, tasks=3)] == [(2, 8)]


def test_output_that_is_an_input_is_refused(models, tmp_path):
    line = one_error_line(cli("merge", "--base", models.base, "--adapter", models.adapter,
                                  "--output", models.adapter + "/", "--overwrite"))
    assert line == (f"error: {models.adapter}: the output is one of the inputs (choose another --output)")
    assert os.path.exists(os.path.join(models.adapter, "adapter_model.safetensors"))


def test_a_task_larger_than_every_node_is_refused_instead_of_waiting_forever():
    from types import SimpleNamespace

    from jobs.scheduling import check_fits
    nodes = [{"Alive": True, "Resources": {"CPU": 2.0, "memory": 4e9}}]
    check_fits(nodes, SimpleNamespace(name="model-00001-of-00002.safetensors", memory_bytes=3e9))
    with pytest.raises(InputError, match="needs about 5.0 GB of worker memory; the largest node offers 4.0 GB"):
        check_fits(nodes, SimpleNamespace(name="model-00001-of-00002.safetensors", memory_bytes=5e9))


def test_only_transient_failures_are_retried():
    from ray import exceptions as ray_errors

    from jobs.executor import InProcessExecutor
    from jobs.ray_executor import RayExecutor
    from jobs.runner import is_transient
    from merge_core.errors import TransientStorageError, ValidationError
    for transient in (RayExecutor.transient, InProcessExecutor.transient):
        assert is_transient(TransientStorageError("s3://b/p: GET: SlowDown"), transient)
        assert is_transient(ConnectionError("reset"), transient)
        assert not is_transient(InputError("x", "bad header", "re-save it"), transient)
        assert not is_transient(ValidationError(["x: sha256 differs"]), transient)
        assert not is_transient(RuntimeError("a bug"), transient)
    assert is_transient(ray_errors.WorkerCrashedError(), RayExecutor.transient)
