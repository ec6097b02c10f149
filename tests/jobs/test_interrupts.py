"""A merge stopped at any moment leaves an output that `--resume` finishes, bit for bit PEFT's.

Real processes, the real S3 server, the session's two-node Ray cluster. The driver is held in
each window it can die in by a test-only pause point (LORA_MERGE_TEST_PAUSE, see
merge_core.publish.journal.pause_point), then SIGKILLed, SIGTERMed or Ctrl-C'd there; its final
task's worker is killed; the store fails during the final task.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from merge_core.names import CLAIM_NAME, INDEX_NAME, JOURNAL_NAME, MANIFEST_NAME
from merge_core.publish.journal import PAUSE_ENV
from tests.jobs.conftest import LORA_MERGE, Models, cli, wait_until
from tests.reference import assert_bit_identical, load_checkpoint

pytestmark = pytest.mark.processes  # each run it stops is a process of its own


class Held:
    """A `lora-merge merge` run, held at pause points named by the test."""

    def __init__(self, tmp_path: Path, args: tuple[str, ...], points: str | None, env: dict | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="run-", dir=tmp_path))
        self.stderr = self.dir / "stderr"
        environment = dict(os.environ, **(env or {}), **({PAUSE_ENV: f"{points}:{self.dir}"} if points else {}))
        with open(self.stderr, "w") as err:
            # its own process group: a signal to the group is what a terminal's Ctrl-C sends
            self.job = subprocess.Popen([LORA_MERGE, "merge", *args], stdout=subprocess.DEVNULL, stderr=err,
                                        env=environment, start_new_session=True)

    def wait_paused(self, point: str, timeout: float = 120) -> None:
        wait_until(lambda: (self.dir / f"{point}.paused").exists() or self.job.poll() is not None, timeout,
                   f"the run to reach {point}")
        assert self.job.poll() is None, f"the run ended before {point}:\n{self.stderr.read_text()}"

    def release(self, point: str) -> None:
        (self.dir / f"{point}.go").touch()

    def signal(self, signum: int) -> None:
        os.killpg(self.job.pid, signum)

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        code = self.job.wait(timeout)
        return code, self.stderr.read_text()

    def processes(self) -> list[int]:
        """This run's driver and the Ray workers of its job (the pause setting reaches them through
        the job's runtime_env), found by their environment: other test sessions' are never touched."""
        name, value_end = f"{PAUSE_ENV}=".encode(), f":{self.dir}".encode()
        found = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    variables = f.read().split(b"\0")
            except OSError:
                continue
            if any(v.startswith(name) and v.endswith(value_end) for v in variables):
                found.append(int(entry))
        return found

    def task_pid(self, title: bytes) -> int:
        """The pid of this run's worker executing the task `title` (Ray titles it ray::<task>)."""
        for pid in self.processes():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read().startswith(b"ray::" + title):
                        return pid
            except OSError:
                continue
        raise AssertionError(f"no worker running {title.decode()}")


def error_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.strip()][-1]


def journal(out: Path) -> list[str]:
    return [s["name"] for s in json.loads((out / JOURNAL_NAME).read_text())["shards"]]


def base_shards(models: Models) -> set[str]:
    return set(json.loads(Path(models.base, INDEX_NAME).read_text())["weight_map"].values())


def shards_on_disk(out: Path) -> set[str]:
    return {n for n in os.listdir(out) if n.endswith(".safetensors")}


def resume_and_check(args: tuple[str, ...], out: Path, models: Models, report: Path) -> dict:
    """--resume ends in PEFT's bits, the journal gone, no temp file left; returns the manifest."""
    resumed = cli("merge", *args, "--resume", "--report", str(report))
    assert resumed.returncode == 0, resumed.stderr
    assert_bit_identical(load_checkpoint(str(out)), models.reference)
    assert [n for n in os.listdir(out) if n.startswith(".")] == [], "no journal, no temp files"
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["reused_shards"] == json.loads(report.read_text())["reused"]
    return manifest


# Where the driver can die, and what the output holds then.
WINDOWS = {
    "clearing": "--overwrite has begun removing an old model: the journal says so, stale files remain",
    "journal-written": "before the first shard: the claim and the journal, vouching for nothing",
    "shard-landed": "a shard published, the driver not yet told: on disk, not in the journal",
    "finalizing": "during the final task: every shard done and vouched for",
    "manifest-written": "between the manifest and the index",
}


@pytest.mark.parametrize("window", WINDOWS)
def test_driver_killed_in_each_window_then_resume_finishes(window, models, ray_session, tmp_path):
    cluster, _ = ray_session
    out = tmp_path / "out"
    args = ("--base", models.base, "--adapter", models.adapter, "--output", str(out), "--ray-address", cluster.address)
    if window == "clearing":  # an old model, and a model.safetensors that loaders would take over the index
        shutil.copytree(models.base, out)
        (out / "model.safetensors").write_bytes(b"stale")
    run = Held(tmp_path, (*args, "--overwrite") if window == "clearing" else args, window)
    run.wait_paused(window)
    run.job.kill()
    run.finish()
    # Ray kills the tasks of a driver that died (its final task, paused, among them) as soon as it
    # notices: nothing of the dead run can still be writing when the resumed one starts.
    wait_until(lambda: run.processes() == [], 10, "the dead driver's tasks to be killed")

    vouched, total = journal(out), len(base_shards(models))
    unvouched = shards_on_disk(out) - set(vouched)
    assert not (out / INDEX_NAME).exists()
    if window == "clearing":
        assert json.loads((out / JOURNAL_NAME).read_text())["clearing"] and vouched == []
        assert (out / "model.safetensors").exists()
    elif window == "journal-written":
        assert sorted(os.listdir(out)) == [CLAIM_NAME, JOURNAL_NAME] and vouched == [], "the claim, the journal"
    elif window == "shard-landed":
        assert vouched == [] and unvouched, "the landed shard is on disk, the journal does not vouch for it"
    else:
        assert len(vouched) == total and (out / MANIFEST_NAME).exists() == (window == "manifest-written")

    manifest = resume_and_check(args, out, models, tmp_path / "report.json")
    reused = {s["name"] for s in manifest["output"]["shards"] if s["reused"]}
    assert reused == set(vouched) and not reused & unvouched, "reused: exactly what the journal vouched for"
    assert not (out / "model.safetensors").exists(), "the interrupted --overwrite was finished first"


def test_resume_refuses_files_that_no_run_recorded(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00001-of-00005.safetensors").write_bytes(b"someone else's")
    refused = cli("merge", "--base", models.base, "--adapter", models.adapter, "--output", str(out), "--resume")
    assert refused.returncode == 2
    assert error_line(refused.stderr) == (f"error: {out}: nothing to resume: the output holds 1 file but no journal "
                                          "of a lora-merge run (pass --overwrite to replace them, or choose an empty "
                                          "--output)")
    assert os.listdir(out) == ["model-00001-of-00005.safetensors"]


def test_final_task_worker_killed_after_the_index_is_retried_and_succeeds(models, ray_session, tmp_path):
    """The retry finds the index its first attempt wrote, and knows it for this merge's. A --resume
    then has nothing to do, and says so."""
    cluster, _ = ray_session
    out = tmp_path / "out"
    args = ("--base", models.base, "--adapter", models.adapter, "--output", str(out), "--ray-address", cluster.address)
    run = Held(tmp_path, args, "index-written")
    run.wait_paused("index-written")
    os.kill(run.task_pid(b"finalize_task"), signal.SIGKILL)
    code, stderr = run.finish()
    assert code == 0, stderr
    assert "retrying the final task (attempt 2)" in stderr
    assert_bit_identical(load_checkpoint(str(out)), models.reference)
    assert [n for n in os.listdir(out) if n.startswith(".")] == []

    again = cli("merge", *args, "--resume")
    assert again.returncode == 0 and again.stdout.startswith(f"{out}: already complete"), again.stderr


def test_ctrl_c_stops_cleanly_a_second_stops_at_once_and_resume_finishes(models, ray_session, tmp_path):
    cluster, _ = ray_session
    out = tmp_path / "out"
    args = ("--base", models.base, "--adapter", models.adapter, "--output", str(out), "--ray-address", cluster.address)
    first = Held(tmp_path, args, "shard-landed")
    first.wait_paused("shard-landed")
    started = time.monotonic()
    first.signal(signal.SIGINT)
    code, stderr = first.finish()
    assert code == 130, stderr
    assert time.monotonic() - started < 15, "stopped promptly"
    assert error_line(stderr) == (f"error: interrupted by SIGINT: 0 of {len(base_shards(models))} shards are done; "
                                  f"run the same command with --resume to finish ({out})")
    assert journal(out) == [] and not (out / INDEX_NAME).exists()
    assert [n for n in os.listdir(out) if n.endswith(".partial")] == []

    # A --resume, stopped twice: the second Ctrl-C comes while the first is being handled.
    second = Held(tmp_path, (*args, "--resume"), "shard-landed,tidying")
    second.wait_paused("shard-landed")
    second.signal(signal.SIGINT)
    second.wait_paused("tidying")
    started = time.monotonic()
    second.signal(signal.SIGINT)
    code, stderr = second.finish()
    assert code == 130 and time.monotonic() - started < 5, stderr
    assert error_line(stderr) == "error: SIGINT again: stopped at once (a --resume run finishes the merge)"

    resume_and_check(args, out, models, tmp_path / "report.json")
