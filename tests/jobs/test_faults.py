"""Faults with real processes: a worker killed by its pid, a node removed, the driver killed, the
S3 server stopped. Each job must end identical to a clean run, or fail cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from infra import s3_server
from merge_core.names import INDEX_NAME, JOURNAL_NAME, MANIFEST_NAME
from tests.conftest import BUCKET, list_keys, open_uploads, upload_dir
from tests.jobs.conftest import LORA_MERGE, OBJECT_STORE_BYTES, Models, run_cli
from tests.reference import MEDIUM, assert_bit_identical, load_checkpoint, make_adapter, make_base, peft_merged


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> Models:
    """About 30 shards, so that a job is still running when a test strikes."""
    root = tmp_path_factory.mktemp("many")
    base = make_base(str(root / "base"), max_shard_size="1MB", **MEDIUM)
    adapter = make_adapter(str(root / "adapter"), sizes=MEDIUM)
    return Models(base, adapter, peft_merged(base, adapter, str(root / "peft")))


def start_merge(*args: str) -> subprocess.Popen:
    return subprocess.Popen([LORA_MERGE, "merge", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(condition, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


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


def test_worker_killed_mid_shard_is_retried_and_the_output_is_identical(many_shards, two_node_cluster, tmp_path):
    cluster, _ = two_node_cluster
    out = tmp_path / "out"
    job = start_merge("--base", many_shards.base, "--adapter", many_shards.adapter, "--output", str(out),
                      "--ray-address", cluster.address)
    wait_until(lambda: journal_shards(out) >= 2, what="two finished shards")
    wait_until(lambda: bool(task_workers(cluster)), what="a worker in the middle of a shard")
    victim = task_workers(cluster)[0]
    os.kill(victim, signal.SIGKILL)
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr
    assert "retrying" in stderr and "WorkerCrashedError" in stderr
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert sum(s["retries"] for s in manifest["output"]["shards"]) >= 1
    assert_bit_identical(load_checkpoint(str(out)), many_shards.reference)


def interrupted_merge(models: Models, cluster, out, shards_done: int) -> tuple[str, ...]:
    """Start a merge, kill its driver once `shards_done` shards are finished; returns its arguments."""
    args = ("--base", models.base, "--adapter", models.adapter, "--output", str(out), "--ray-address", cluster.address)
    job = start_merge(*args)
    wait_until(lambda: journal_shards(out) >= shards_done, what=f"{shards_done} finished shards")
    job.kill()
    job.communicate()
    assert not (out / INDEX_NAME).exists()
    return args


def test_driver_killed_then_resume_reuses_proven_shards(many_shards, two_node_cluster, tmp_path):
    cluster, _ = two_node_cluster
    out = tmp_path / "out"
    args = interrupted_merge(many_shards, cluster, out, 4)
    done_before = journal_shards(out)

    refused = run_cli("merge", *args)
    assert refused.returncode == 2
    assert "holds an unfinished merge" in refused.stderr and "pass --resume to finish it" in refused.stderr

    resumed = run_cli("merge", *args, "--resume", "--report", str(tmp_path / "report.json"))
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["reused"] >= done_before >= 4
    assert json.loads((out / MANIFEST_NAME).read_text())["reused_shards"] == report["reused"]
    assert not (out / JOURNAL_NAME).exists(), "the journal is gone once the model is published"
    assert_bit_identical(load_checkpoint(str(out)), many_shards.reference)


def test_resume_redoes_a_shard_whose_bytes_changed(many_shards, two_node_cluster, tmp_path):
    cluster, _ = two_node_cluster
    out = tmp_path / "out"
    args = interrupted_merge(many_shards, cluster, out, 3)
    first = json.loads((out / JOURNAL_NAME).read_text())["shards"][0]["name"]
    with open(out / first, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    resumed = run_cli("merge", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    shards = {s["name"]: s for s in json.loads((out / MANIFEST_NAME).read_text())["output"]["shards"]}
    assert shards[first]["reused"] is False, "a shard whose bytes no longer match its record is merged again"
    assert_bit_identical(load_checkpoint(str(out)), many_shards.reference)


def test_resume_refuses_a_journal_of_other_inputs(many_shards, two_node_cluster, tmp_path):
    cluster, _ = two_node_cluster
    out = tmp_path / "out"
    interrupted_merge(many_shards, cluster, out, 1)
    other = run_cli("merge", "--base", many_shards.base, "--adapter", many_shards.adapter, "--weight", "0.5",
                    "--output", str(out), "--ray-address", cluster.address, "--resume")
    assert other.returncode == 2
    assert "the unfinished merge here had other inputs or settings" in other.stderr


def test_node_removed_mid_run_the_job_completes_on_the_others(many_shards, s3, tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": OBJECT_STORE_BYTES})
    keep = cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE_BYTES)
    doomed = cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE_BYTES)
    cluster.wait_for_nodes()
    try:
        out = tmp_path / "out"
        job = start_merge("--base", many_shards.base, "--adapter", many_shards.adapter, "--output", str(out),
                          "--ray-address", cluster.address)
        wait_until(lambda: journal_shards(out) >= 3, what="three finished shards")
        cluster.remove_node(doomed, allow_graceful=False)
        stdout, stderr = job.communicate(timeout=300)
        assert job.returncode == 0, stderr
        nodes = {s["node"] for s in json.loads((out / MANIFEST_NAME).read_text())["output"]["shards"]}
        assert keep.node_id in nodes
        assert_bit_identical(load_checkpoint(str(out)), many_shards.reference)
    finally:
        cluster.shutdown()


def test_s3_stopped_for_a_few_seconds_mid_run_is_ridden_out(s3, many_shards, two_node_cluster, tmp_path):
    cluster, _ = two_node_cluster
    base, adapter = upload_dir(s3, many_shards.base, "outage/base"), upload_dir(s3, many_shards.adapter,
                                                                                 "outage/adapter")
    job = start_merge("--base", base, "--adapter", adapter, "--output", f"s3://{BUCKET}/outage/out",
                      "--ray-address", cluster.address)
    wait_until(lambda: s3_journal_shards(s3, "outage/out") >= 1, what="a finished shard")
    s3_server.restart(s3_server.load(s3.data_dir), pause=3)
    stdout, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr
    assert INDEX_NAME in list_keys(s3, "outage/out") and open_uploads(s3, "outage/out") == []
    local = tmp_path / "downloaded"
    local.mkdir()
    for name in list_keys(s3, "outage/out"):
        s3.client().download_file(BUCKET, f"outage/out/{name}", str(local / name))
    assert_bit_identical(load_checkpoint(str(local)), many_shards.reference)


def test_s3_stopped_for_good_exits_3_after_bounded_retries(s3, many_shards, two_node_cluster, tmp_path):
    base = upload_dir(s3, many_shards.base, "gone/base")
    adapter = upload_dir(s3, many_shards.adapter, "gone/adapter")
    env = dict(os.environ, AWS_MAX_ATTEMPTS="2")
    job = subprocess.Popen([LORA_MERGE, "merge", "--base", base, "--adapter", adapter, "--output",
                            f"s3://{BUCKET}/gone/out"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=env)
    wait_until(lambda: s3_journal_shards(s3, "gone/out") >= 1, what="a finished shard")
    server = s3_server.load(s3.data_dir)
    s3_server.stop(server)
    try:
        stdout, stderr = job.communicate(timeout=600)
    finally:
        s3_server.start_again(server)
    assert job.returncode == 3, stderr
    assert stderr.strip().splitlines()[-1].startswith("error: TransientStorageError: s3://")
    assert INDEX_NAME not in list_keys(s3, "gone/out")
    # Uploads the dead store could not be told to abort go with the next run over this output.
    rerun = run_cli("merge", "--base", base, "--adapter", adapter, "--output", f"s3://{BUCKET}/gone/out",
                    "--resume", "--ray-address", two_node_cluster[0].address)  # its nodes know the restarted store
    assert rerun.returncode == 0, rerun.stderr
    assert open_uploads(s3, "gone/out") == []
