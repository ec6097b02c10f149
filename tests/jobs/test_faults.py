"""Faults with real processes: a worker killed by its pid, a node removed, the driver killed, the
S3 server stopped. Each job must end identical to a clean run, or fail cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

from lora_merge import s3_server
from merge_core.names import INDEX_NAME, JOURNAL_NAME, MANIFEST_NAME
from merge_core.publish.journal import PAUSE_ENV
from tests.conftest import BUCKET, download, list_keys, open_uploads, upload_dir
from tests.jobs.conftest import LORA_MERGE, OBJECT_STORE_BYTES, Beside, cli, wait_until
from tests.reference import assert_bit_identical, load_checkpoint

pytestmark = pytest.mark.processes  # each kills or stops a process: a worker, a node, a driver, the store


def start_merge(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([LORA_MERGE, "merge", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def journal_shards(out) -> int:
    try:
        return len(json.loads((out / JOURNAL_NAME).read_text())["shards"])
    except (OSError, ValueError):
        return 0


def task_workers(cluster) -> list[int]:
    """Pids of this cluster's Ray workers executing a merge task (Ray titles them ray::<task name>;
    their parent is a raylet of the cluster: another test session's workers are never touched)."""
    raylets = {p.process.pid for node in cluster.list_all_nodes() for p in node.all_processes.get("raylet", [])}
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read()
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if title.startswith(b"ray::merge_shard_task") and parent in raylets:
            pids.append(int(entry))
    return pids


def s3_journal_shards(s3, prefix: str) -> int:
    """Shards the journal on S3 records (the journal itself exists from the run's start)."""
    try:
        body = s3.client().get_object(Bucket=BUCKET, Key=f"{prefix}/{JOURNAL_NAME}")["Body"].read()
        return len(json.loads(body)["shards"])
    except Exception:  # not there yet, or the server is restarting
        return 0


def test_worker_killed_mid_shard_is_retried_and_the_output_is_identical(many_shards, ray_session, tmp_path):
    cluster, _ = ray_session
    out = tmp_path / "out"

    def kill_a_worker():
        wait_until(lambda: journal_shards(out) >= 2, what="two finished shards")
        wait_until(lambda: bool(task_workers(cluster)), what="a worker in the middle of a shard")
        os.kill(task_workers(cluster)[0], signal.SIGKILL)

    killer = Beside(kill_a_worker)
    run = cli("merge", "--base", many_shards.base, "--adapter", many_shards.adapter, "--output", str(out))
    killer.result()
    assert run.returncode == 0, run.stderr
    assert "retrying" in run.stderr and "WorkerCrashedError" in run.stderr
    assert re.search(r"retrying model-\S+ \(attempt 2\): WorkerCrashedError: .*; again in \d\.\d s", run.stderr)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert sum(s["retries"] for s in manifest["output"]["shards"]) >= 1
    reasons = [r for shard in manifest["retry_reasons"].values() for r in shard]
    assert reasons and all(r.startswith("WorkerCrashedError") for r in reasons), "why each retry, in the manifest"
    assert_bit_identical(load_checkpoint(str(out)), many_shards.reference)


def test_driver_killed_then_resume_reuses_only_proven_shards(many_shards, ray_session, tmp_path):
    """The driver SIGKILLed after four shards: a plain re-run and a --resume with other inputs are
    refused; a shard whose bytes changed since is merged again, every other one reused."""
    cluster, _ = ray_session
    out = tmp_path / "out"
    args = ("--base", many_shards.base, "--adapter", many_shards.adapter, "--output", str(out))
    job = start_merge(*args, "--ray-address", cluster.address)
    wait_until(lambda: journal_shards(out) >= 4, what="four finished shards")
    job.kill()
    job.communicate()
    assert not (out / INDEX_NAME).exists()
    done_before = journal_shards(out)

    refused = cli("merge", *args)
    assert refused.returncode == 2
    assert "holds an unfinished merge" in refused.stderr and "pass --resume to finish it" in refused.stderr
    other = cli("merge", *args, "--weight", "0.5", "--resume")
    assert other.returncode == 2 and "the unfinished merge here had other inputs or settings" in other.stderr

    changed = json.loads((out / JOURNAL_NAME).read_text())["shards"][0]["name"]
    with open(out / changed, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    resumed = cli("merge", *args, "--resume", "--report", str(tmp_path / "report.json"))
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    shards = {s["name"]: s for s in manifest["output"]["shards"]}
    assert shards[changed]["reused"] is False, "a shard whose bytes no longer match its record is merged again"
    assert report["reused"] == manifest["reused_shards"] >= done_before - 1 >= 3
    assert not (out / JOURNAL_NAME).exists(), "the journal is gone once the model is published"
    assert_bit_identical(load_checkpoint(str(out)), many_shards.reference)


def test_node_removed_mid_run_the_job_completes_on_the_others(many_shards, ray_session, tmp_path):
    cluster, _ = ray_session
    doomed = cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE_BYTES)
    cluster.wait_for_nodes()
    out = tmp_path / "out"

    def remove_node():
        wait_until(lambda: journal_shards(out) >= 3, what="three finished shards")
        cluster.remove_node(doomed, allow_graceful=False)

    remover = Beside(remove_node)
    run = cli("merge", "--base", many_shards.base, "--adapter", many_shards.adapter, "--output", str(out))
    remover.result()
    assert run.returncode == 0, run.stderr
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert f"cpu@{doomed.node_id[:8]}" in manifest["cluster"]["lanes"], "the doomed node took shards"
    assert {s["node"] for s in manifest["output"]["shards"]} - {doomed.node_id}, "the others finished the job"
    assert_bit_identical(load_checkpoint(str(out)), many_shards.reference)


def test_s3_stopped_for_a_few_seconds_mid_run_is_ridden_out(s3, models, ray_session, tmp_path, monkeypatch):
    """The store goes away as soon as the first shard has landed and comes back a few seconds
    later: the shards submitted meanwhile ride it out on botocore's retries."""
    base, adapter = upload_dir(s3, models.base, "outage/base"), upload_dir(s3, models.adapter, "outage/adapter")
    monkeypatch.setenv(PAUSE_ENV, f"shard-landed:{tmp_path}")  # the driver, in this process, holds there

    def outage():
        wait_until(lambda: (tmp_path / "shard-landed.paused").exists(), what="the first shard")
        server = s3_server.load(s3.data_dir)
        s3_server.stop(server)
        (tmp_path / "shard-landed.go").touch()
        time.sleep(1)
        s3_server.start_again(server)

    restarter = Beside(outage)
    run = cli("merge", "--base", base, "--adapter", adapter, "--output", f"s3://{BUCKET}/outage/out")
    restarter.result()
    assert run.returncode == 0, run.stderr
    assert INDEX_NAME in list_keys(s3, "outage/out") and open_uploads(s3, "outage/out") == []
    assert_bit_identical(load_checkpoint(download(s3, "outage/out", tmp_path / "downloaded")), models.reference)
