"""`--executor local`: the shard tasks on threads of the command's own process, no Ray started.

The merge is PEFT's bit for bit with tasks running side by side; a process that merges this way
never imports Ray; tasks really do run at once; Ctrl-C ends the running tasks at their next tensor
with nothing half-written left, and --resume finishes; the options that cannot go with it are
refused in one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from jobs.executor import LocalExecutor
from jobs.tasks import Placement
from merge_core.errors import Stopped
from merge_core.names import INDEX_NAME, MANIFEST_NAME
from merge_core.numerics.workspace import workspace_for
from tests.jobs.conftest import cli
from tests.jobs.test_interrupts import Held, error_line, journal
from tests.reference import assert_bit_identical, load_checkpoint

pytestmark = pytest.mark.processes  # runs of the command as processes of their own (no cluster, no S3)

NO_RAY_SCRIPT = """
import sys, lora_merge
summary = lora_merge.merge(sys.argv[1], sys.argv[2], sys.argv[3], executor="local", device="cpu")
assert "ray" not in sys.modules, "a local merge imported Ray"
print(summary.fused_tensors)
"""


def test_a_local_merge_is_pefts_bit_for_bit_and_never_imports_ray(models, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", NO_RAY_SCRIPT, models.base, models.adapter, str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) > 0
    assert_bit_identical(load_checkpoint(str(out)), models.reference)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert {s["node"] for s in manifest["output"]["shards"]} == {"local"}
    assert (out / INDEX_NAME).exists()

    again = cli("merge", "--base", models.base, "--adapter", models.adapter, "--output", str(out),
                "--executor", "local")
    assert again.returncode == 0 and "already complete" in again.stdout + again.stderr, again.stderr


def test_tasks_run_side_by_side_each_with_buffers_of_its_own():
    executor = LocalExecutor()
    executor.start()
    both = threading.Barrier(2, timeout=30)  # broken (an error) unless two tasks wait at once

    def work(where: Placement):
        both.wait()
        return where.node, where.cpus, workspace_for("cpu")

    handles = [executor.submit(work, (), {"num_cpus": 1}) for _ in range(2)]
    results = [executor.get(h) for h in handles]
    assert [r[:2] for r in results] == [("local", 1), ("local", 1)]
    assert results[0][2] is not results[1][2]
    assert executor.wait(handles, 0) == [handles[0]]


def _overlap(executor: LocalExecutor, memory: int) -> int:
    """The most of three tasks, each asking `memory` bytes, that ran at once."""
    lock, active, most = threading.Lock(), [0], [0]

    def work(where: Placement):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.3)
        with lock:
            active[0] -= 1

    handles = [executor.submit(work, (), {"num_cpus": 1, "memory": memory}) for _ in range(3)]
    for handle in handles:
        executor.get(handle)
    return most[0]


def test_tasks_wait_for_the_memory_they_ask_for():
    executor = LocalExecutor()
    executor.start()
    budget = int(executor.nodes()[0]["Resources"]["memory"])
    assert budget > 0
    assert _overlap(executor, budget // 2 + 1) == 1
    assert _overlap(executor, budget // 3) == 3


def test_cancel_waits_for_every_running_task_even_one_it_was_not_given():
    executor = LocalExecutor()
    executor.start()
    began = threading.Event()

    def work(where: Placement):
        began.set()
        while not where.stop.is_set():
            time.sleep(0.01)
        raise Stopped("stopped")

    handle = executor.submit(work, (), {"num_cpus": 1})
    assert began.wait(10)
    executor.cancel([])
    assert handle.done() and isinstance(handle.exception(), Stopped)


def test_a_stopped_task_ends_at_its_next_tensor_and_writes_nothing(models, tmp_path):
    from jobs.api import options_for
    from jobs.options import MergeOptions
    from jobs.prepare import prepare
    from jobs.tasks import merge_shard_work
    from merge_core.worker.job import MergeJob

    options = options_for(MergeOptions, base=models.base, adapters=[models.adapter],
                          output=str(tmp_path / "out"))
    plan = prepare(options).plan
    stop = threading.Event()
    stop.set()
    with pytest.raises(Stopped, match=plan.tasks[0].name):
        merge_shard_work(plan.tasks[0], MergeJob.of(plan, options.output), Placement("local", 1, stop=stop))
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_a_stopped_verify_task_ends_at_its_next_tensor(models, tmp_path):
    from jobs.api import options_for
    from jobs.options import VerifyOptions
    from jobs.prepare import prepare
    from jobs.tasks import verify_shard_work
    from merge_core.worker.job import MergeJob

    out = tmp_path / "out"
    assert cli("merge", "--base", models.base, "--adapter", models.adapter, "--output", str(out), "--executor",
               "local").returncode == 0
    options = options_for(VerifyOptions, base=models.base, adapters=[models.adapter], merged=str(out))
    plan = prepare(options).plan
    stop = threading.Event()
    stop.set()
    with pytest.raises(Stopped, match=plan.tasks[0].name):
        verify_shard_work(plan.tasks[0], MergeJob.of(plan, str(out)), None, None, 0, Placement("local", 1, stop=stop))


def test_ctrl_c_in_the_final_task_publishes_nothing_and_resume_finishes(models, tmp_path):
    out = tmp_path / "out"
    args = ("--base", models.base, "--adapter", models.adapter, "--output", str(out), "--executor", "local")
    held = Held(tmp_path, args, "finalizing")
    held.wait_paused("finalizing")
    held.signal(signal.SIGINT)
    time.sleep(0.5)  # the driver is stopping, waiting for its final task, which is held here
    held.release("finalizing")
    code, stderr = held.finish()
    assert code == 130, stderr
    assert error_line(stderr).startswith("error: interrupted by SIGINT: "), stderr
    assert not (out / INDEX_NAME).exists() and not (out / MANIFEST_NAME).exists()
    resumed = cli("merge", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_bit_identical(load_checkpoint(str(out)), models.reference)


def test_ctrl_c_stops_the_running_tasks_and_resume_finishes(models, tmp_path):
    out = tmp_path / "out"
    args = ("--base", models.base, "--adapter", models.adapter, "--output", str(out), "--executor", "local",
            "--task-cpus", "1")
    held = Held(tmp_path, args, "shard-landed")
    held.wait_paused("shard-landed")
    started = time.monotonic()
    held.signal(signal.SIGINT)
    code, stderr = held.finish()
    assert code == 130 and time.monotonic() - started < 15, stderr
    assert error_line(stderr).startswith("error: interrupted by SIGINT: "), stderr
    assert journal(out) == [] and not (out / INDEX_NAME).exists()
    assert [n for n in os.listdir(out) if n.endswith(".partial")] == []

    resumed = cli("merge", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_bit_identical(load_checkpoint(str(out)), models.reference)


@pytest.mark.parametrize("flags, message", [
    (("--ray-address", "auto"), "error: --executor local: runs without Ray, so --ray-address auto would go unused "
                                "(leave out --ray-address, or use --executor ray)"),
    (("--device", "cuda"), "error: --device cuda: --executor local fuses on this machine's CPUs (use --executor ray "
                           "to fuse on GPUs, or --device auto or cpu)"),
])
def test_what_cannot_go_with_a_local_run_is_refused_in_one_line(models, tmp_path, flags, message):
    out = tmp_path / "out"
    done = cli("merge", "--base", models.base, "--adapter", models.adapter, "--output", str(out),
               "--executor", "local", *flags)
    assert done.returncode == 2 and done.stderr.strip() == message, done.stderr
    assert not out.exists()
