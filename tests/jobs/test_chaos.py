"""Chaos: runs struck at random moments, by seed, then resumed; every one must end with PEFT's
bytes, no multipart upload left open, no claim or journal left, and no second writer let in.

Each seed draws one strike (SIGKILL of the driver, SIGKILL of a worker in a shard, or the S3
server restarted after a pause) and a moment for it, and tries a second job on the same output
while the first runs. The suite runs CHAOS_RUNS seeds (default 2);
`CHAOS_RUNS=30 pytest tests/jobs/test_chaos.py -s` runs more and prints what each covered."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import pytest

from lora_merge import s3_server
from merge_core.names import CLAIM_NAME, INDEX_NAME, JOURNAL_NAME
from tests.conftest import BUCKET, download, list_keys, open_uploads, upload_dir
from tests.jobs.conftest import LORA_MERGE, Models, cli
from tests.jobs.test_faults import task_workers
from tests.reference import assert_bit_identical, load_checkpoint

pytestmark = pytest.mark.processes
RUNS = int(os.environ.get("CHAOS_RUNS", "2"))
STRIKES = ("driver", "worker", "store")


@pytest.fixture(scope="module")
def medium_s3(medium, s3) -> Models:
    return Models(upload_dir(s3, medium.base, "chaos/base"), upload_dir(s3, medium.adapter, "chaos/adapter"),
                  medium.reference)


def where_it_was(s3, prefix: str) -> str:
    """The run's state when struck, from what the store holds."""
    keys = list_keys(s3, prefix)
    if INDEX_NAME in keys:
        return "published"
    if JOURNAL_NAME not in keys:
        return "before its journal"
    try:
        body = s3.client().get_object(Bucket=BUCKET, Key=f"{prefix}/{JOURNAL_NAME}")["Body"].read()
        return f"{len(json.loads(body)['shards'])} shards vouched for"
    except Exception:
        return "journal unreadable"


@pytest.mark.parametrize("seed", range(RUNS))
def test_struck_at_random_then_resumed_ends_as_peft(seed, s3, medium_s3, ray_session, tmp_path):
    cluster, _ = ray_session
    rng = random.Random(seed)
    strike = STRIKES[seed] if seed < len(STRIKES) else rng.choice(STRIKES)  # the first seeds: each kind once
    delay = rng.uniform(1, 8)
    prefix = f"chaos/out-{seed}"
    args = ("--base", medium_s3.base, "--adapter", medium_s3.adapter, "--output", f"s3://{BUCKET}/{prefix}",
            "--part-size-mb", "5")
    job = subprocess.Popen([LORA_MERGE, "merge", *args, "--ray-address", cluster.address],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay * 0.4)
    second = cli("merge", *args)  # a second job on the same output while the first runs
    time.sleep(delay * 0.6)
    state = where_it_was(s3, prefix)
    if strike == "driver":
        job.kill()
    elif strike == "worker":
        workers = task_workers(cluster)
        if workers:
            os.kill(workers[0], signal.SIGKILL)
    else:
        s3_server.restart(s3_server.load(s3.data_dir), pause=rng.uniform(0, 2))
    stdout, stderr = job.communicate(timeout=300)
    wrote = [run.returncode == 0 and "already complete" not in run.stdout for run in (second, )]
    wrote.append(job.returncode == 0 and "already complete" not in stdout)
    assert sum(wrote) <= 1, f"two writers: {second.stderr[-2000:]}\n{stderr[-2000:]}"
    assert second.returncode in (0, 2) and job.returncode in (0, 2, 3, -signal.SIGKILL), stderr[-2000:]

    for _ in range(3):  # resumed until done: the first resume may itself meet the store coming back
        resumed = cli("merge", *args, "--resume")
        if resumed.returncode == 0:
            break
    assert resumed.returncode == 0, resumed.stderr
    keys = list_keys(s3, prefix)
    assert open_uploads(s3, prefix) == [] and JOURNAL_NAME not in keys and CLAIM_NAME not in keys
    assert_bit_identical(load_checkpoint(download(s3, prefix, tmp_path / "out")), medium_s3.reference)
    writer = "the second job" if wrote[0] else "the first job" if wrote[1] else "the resume"
    print(f"chaos seed {seed}: {strike} struck after {delay:.1f} s, the run {state} then; the first job exited "
          f"{job.returncode}, the second {second.returncode}; {writer} wrote; resumed to PEFT's bytes")
