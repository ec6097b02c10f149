"""The store failing under a run: SIGTERM with uploads open, the S3 server gone for good, the S3
server failing during the final task. Real processes, the real S3 server (SeaweedFS), Ray."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from lora_merge import s3_server
from merge_core.names import INDEX_NAME, JOURNAL_NAME, MANIFEST_NAME
from tests.conftest import BUCKET, download, list_keys, open_uploads, upload_dir
from tests.jobs.conftest import Models, cli, wait_until
from tests.jobs.test_interrupts import Held, error_line
from tests.reference import assert_bit_identical, load_checkpoint

pytestmark = pytest.mark.processes  # each run it stops is a process of its own


@pytest.fixture(scope="module")
def medium_on_s3(medium, s3) -> Models:
    return Models(upload_dir(s3, medium.base, "interrupts/base"), upload_dir(s3, medium.adapter, "interrupts/adapter"),
                  medium.reference)


def s3_json(s3, key: str) -> dict:
    return json.loads(s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())


def test_sigterm_mid_upload_on_s3_aborts_uploads_then_resume_finishes(s3, medium_on_s3, ray_session, tmp_path):
    medium = medium_on_s3
    cluster, _ = ray_session
    prefix = "interrupts/sigterm"
    args = ("--base", medium.base, "--adapter", medium.adapter, "--output", f"s3://{BUCKET}/{prefix}",
            "--part-size-mb", "5", "--ray-address", cluster.address)
    run = Held(tmp_path, args, None)
    wait_until(lambda: open_uploads(s3, prefix) != [], 120, "a shard's multipart upload to be open")
    started = time.monotonic()
    run.signal(signal.SIGTERM)
    code, stderr = run.finish()
    assert code == 3, stderr
    assert time.monotonic() - started < 15, "stopped promptly"
    vouched = s3_json(s3, f"{prefix}/{JOURNAL_NAME}")["shards"]
    shards = set(s3_json(s3, f"interrupts/base/{INDEX_NAME}")["weight_map"].values())
    assert error_line(stderr) == (f"error: interrupted by SIGTERM: {len(vouched)} of {len(shards)} shards are done; "
                                  f"run the same command with --resume to finish (s3://{BUCKET}/{prefix})")
    assert open_uploads(s3, prefix) == [], "the cancelled workers' uploads were aborted"
    assert INDEX_NAME not in list_keys(s3, prefix)

    resumed = cli("merge", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert open_uploads(s3, prefix) == [] and JOURNAL_NAME not in list_keys(s3, prefix)
    assert_bit_identical(load_checkpoint(download(s3, prefix, tmp_path / "out")), medium.reference)


@pytest.fixture(scope="module")
def flaky_store_cluster(s3):
    """A Ray of its own whose workers inherit AWS_MAX_ATTEMPTS=1: the store's errors reach the
    tasks at once (the session's cluster has botocore retry for a minute)."""
    from ray.cluster_utils import Cluster

    from jobs.ray_executor import LOCAL_SYSTEM_CONFIG

    saved = os.environ.get("AWS_MAX_ATTEMPTS")
    os.environ["AWS_MAX_ATTEMPTS"] = "1"
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 80 * 2**20,
                                                                "_system_config": LOCAL_SYSTEM_CONFIG})
        cluster.wait_for_nodes()
    finally:
        os.environ.pop("AWS_MAX_ATTEMPTS") if saved is None else os.environ.update(AWS_MAX_ATTEMPTS=saved)
    yield cluster
    cluster.shutdown()


def test_s3_stopped_for_good_exits_3_after_bounded_retries(s3, models, flaky_store_cluster, ray_session, tmp_path):
    """The store goes away once the first shard has landed: every shard after it fails, is retried
    a bounded number of times, and the run exits 3 without an index; once the store is back a
    --resume finishes the same output."""
    base, adapter = upload_dir(s3, models.base, "gone/base"), upload_dir(s3, models.adapter, "gone/adapter")
    args = ("--base", base, "--adapter", adapter, "--output", f"s3://{BUCKET}/gone/out")
    run = Held(tmp_path, (*args, "--ray-address", flaky_store_cluster.address), "shard-landed",
               env={"AWS_MAX_ATTEMPTS": "1"})
    run.wait_paused("shard-landed")
    server = s3_server.load(s3.data_dir)
    s3_server.stop(server)
    try:
        run.release("shard-landed")
        code, stderr = run.finish(timeout=300)
    finally:
        s3_server.start_again(server)
    assert code == 3, stderr
    assert error_line(stderr).startswith("error: TransientStorageError: s3://")
    assert "retrying model-" in stderr, "shards were retried before the run gave up"
    assert INDEX_NAME not in list_keys(s3, "gone/out")
    # What the dead store could not be told (uploads to abort, the journal) goes with the next run.
    rerun = cli("merge", *args, "--resume")
    assert rerun.returncode == 0, rerun.stderr
    assert open_uploads(s3, "gone/out") == [] and JOURNAL_NAME not in list_keys(s3, "gone/out")
    assert_bit_identical(load_checkpoint(download(s3, "gone/out", tmp_path / "out")), models.reference)


def test_s3_failing_during_the_final_task_is_ridden_out(s3, models, flaky_store_cluster, tmp_path):
    """The store's errors reach the final task at once, which fails, and is retried once the store
    is back. The first try of a job spec with `resume: true` (an output that does not exist yet)
    just runs."""
    base, adapter = upload_dir(s3, models.base, "flaky/base"), upload_dir(s3, models.adapter, "flaky/adapter")
    args = ("--base", base, "--adapter", adapter, "--output", f"s3://{BUCKET}/flaky/out", "--resume",
            "--ray-address", flaky_store_cluster.address)
    run = Held(tmp_path, args, "finalizing", env={"AWS_MAX_ATTEMPTS": "1"})
    run.wait_paused("finalizing", timeout=180)
    server = s3_server.load(s3.data_dir)
    s3_server.stop(server)
    try:
        run.release("finalizing")
        wait_until(lambda: "retrying the final task" in run.stderr.read_text() or run.job.poll() is not None, 60,
                   "the final task to fail")
    finally:
        s3_server.start_again(server)
    code, stderr = run.finish()
    assert code == 0, stderr
    assert "retrying the final task (attempt 2)" in stderr
    assert INDEX_NAME in list_keys(s3, "flaky/out") and open_uploads(s3, "flaky/out") == []
    manifest = json.loads(s3.client().get_object(Bucket=BUCKET, Key=f"flaky/out/{MANIFEST_NAME}")["Body"].read())
    (reason,) = manifest["retry_reasons"]["final task"]  # the attempt that met the store down, in one line
    assert reason.startswith("TransientStorageError: s3://"), reason
    assert_bit_identical(load_checkpoint(download(s3, "flaky/out", tmp_path / "out")), models.reference)
