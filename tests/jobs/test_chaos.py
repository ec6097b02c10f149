"""Chaos: runs struck at random moments, by seed, then resumed; every one must end with PEFT's
bytes, no multipart upload left open, no claim or journal left, and no second writer let in.

Each seed draws one strike (SIGKILL of the driver, SIGKILL of a worker, or the S3 server
restarted after a pause) and a moment for it (once a random number of the 16 shards is vouched
for, plus up to 0.5 s), and tries a second job on the same output once the first holds it. The
suite runs CHAOS_RUNS seeds (default 2); `CHAOS_RUNS=30 pytest tests/jobs/test_chaos.py -s`
runs more and prints what each covered."""

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
from tests.jobs.conftest import LORA_MERGE, Models, cli, wait_until
from tests.jobs.test_faults import task_workers
from tests.reference import assert_bit_identical, load_checkpoint

pytestmark = pytest.mark.processes
RUNS = int(os.environ.get("CHAOS_RUNS", "2"))
STRIKES = ("driver", "worker", "store")
SHARDS = 16  # of the many-shards model (tests/jobs/conftest.py)


@pytest.fixture(scope="module")
def many_on_s3(many_shards, s3) -> Models:
    return Models(upload_dir(s3, many_shards.base, "chaos/base"), upload_dir(s3, many_shards.adapter, "chaos/adapter"),
                  many_shards.reference)


def vouched(s3, prefix: str) -> int:
    try:
        body = s3.client().get_object(Bucket=BUCKET, Key=f"{prefix}/{JOURNAL_NAME}")["Body"].read()
        return len(json.loads(body)["shards"])
    except Exception:  # not there yet, gone, or the store restarting
        return 0


def where_it_was(s3, prefix: str) -> str:
    """The run's state when struck, from what the store holds."""
    keys = list_keys(s3, prefix)
    if INDEX_NAME in keys:
        return "published"
    if JOURNAL_NAME not in keys:
        return "before its journal"
    return f"{vouched(s3, prefix)} shards vouched for"


@pytest.mark.parametrize("seed", range(RUNS))
def test_struck_at_random_then_resumed_ends_as_peft(seed, s3, many_on_s3, ray_session, tmp_path):
    cluster, _ = ray_session
    rng = random.Random(seed)
    strike = STRIKES[seed] if seed < len(STRIKES) else rng.choice(STRIKES)  # the first seeds: each kind once
    when = rng.randint(0, SHARDS)  # strike once this many shards are vouched for (all: at or after the final task)
    prefix = f"chaos/out-{seed}"
    args = ("--base", many_on_s3.base, "--adapter", many_on_s3.adapter, "--output", f"s3://{BUCKET}/{prefix}")
    job = subprocess.Popen([LORA_MERGE, "merge", *args, "--ray-address", cluster.address],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: CLAIM_NAME in list_keys(s3, prefix) or job.poll() is not None, 120, "the run's claim")
    second = cli("merge", *args)  # a second job on the same output while the first holds it: refused
    assert second.returncode == 2 and "another job is writing this output" in second.stderr, second.stderr
    wait_until(lambda: vouched(s3, prefix) >= when or job.poll() is not None, 300, f"{when} shards")
    time.sleep(rng.uniform(0, 0.5))
    state = where_it_was(s3, prefix)
    if strike == "driver":
        job.kill()
    elif strike == "worker":
        workers = task_workers(cluster)
        if workers:
            os.kill(rng.choice(workers), signal.SIGKILL)
    else:
        s3_server.restart(s3_server.load(s3.data_dir), pause=rng.uniform(0, 2))
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode in (0, 3, -signal.SIGKILL), stderr[-2000:]

    for _ in range(3):  # resumed until done: the first resume may itself meet the store coming back
        resumed = cli("merge", *args, "--resume")
        if resumed.returncode == 0:
            break
    assert resumed.returncode == 0, resumed.stderr
    keys = list_keys(s3, prefix)
    assert open_uploads(s3, prefix) == [] and JOURNAL_NAME not in keys and CLAIM_NAME not in keys
    assert_bit_identical(load_checkpoint(download(s3, prefix, tmp_path / "out")), many_on_s3.reference)
    print(f"chaos seed {seed}: {strike} struck with {state}; the first job exited {job.returncode}, the second "
          f"was refused; resumed to PEFT's bytes")
