"""Merges to and from a real S3 server (SeaweedFS), on the two-node Ray cluster."""

from __future__ import annotations

import glob
import json
import os

from merge_core.names import INDEX_NAME, MANIFEST_NAME
from tests.conftest import BUCKET, SENTINEL_SECRET, download, list_keys, open_uploads, upload_dir
from tests.jobs.conftest import cli
from tests.reference import assert_bit_identical, load_checkpoint

# Every command run here, for the credential check at the end (a file runs in one test process).
RUNS: list = []


def merge(*args: str):
    run = cli("merge", *args)
    RUNS.append(run)
    return run


def test_s3_to_s3_merge_uploads_shards_in_parts_and_equals_peft(s3, medium, ray_session, tmp_path):
    cluster, _ = ray_session
    base, adapter = upload_dir(s3, medium.base, "s2s/base"), upload_dir(s3, medium.adapter, "s2s/adapter")
    run = merge("--base", base, "--adapter", adapter, "--output", f"s3://{BUCKET}/s2s/out", "--part-size-mb", "5",
                "--ray-address", cluster.address)
    assert run.returncode == 0, run.stderr
    shards = [n for n in list_keys(s3, "s2s/out") if n.endswith(".safetensors")]
    parts = [int(s3.client().head_object(Bucket=BUCKET, Key=f"s2s/out/{n}")["ETag"].strip('"').split("-")[1])
             for n in shards]
    assert len(shards) >= 2 and min(parts) >= 2, "each shard went up as a multipart upload of several parts"
    assert open_uploads(s3, "s2s/out") == []
    assert_bit_identical(load_checkpoint(download(s3, "s2s/out", tmp_path / "out")), medium.reference)
    assert json.load(open(tmp_path / "out" / MANIFEST_NAME))["base"]["uri"] == base


def test_local_to_s3_and_s3_to_local(s3, models, ray_session, tmp_path):
    cluster, _ = ray_session
    run = merge("--base", models.base, "--adapter", models.adapter, "--output", f"s3://{BUCKET}/l2s/out",
                "--ray-address", cluster.address)
    assert run.returncode == 0, run.stderr
    assert_bit_identical(load_checkpoint(download(s3, "l2s/out", tmp_path / "l2s")), models.reference)

    base, adapter = upload_dir(s3, models.base, "s2l/base"), upload_dir(s3, models.adapter, "s2l/adapter")
    run = merge("--base", base, "--adapter", adapter, "--output", str(tmp_path / "s2l"),
                "--ray-address", cluster.address)
    assert run.returncode == 0, run.stderr
    assert_bit_identical(load_checkpoint(str(tmp_path / "s2l")), models.reference)
    assert sorted(os.listdir(tmp_path / "s2l")) == sorted(os.listdir(tmp_path / "l2s"))


def test_second_publish_without_overwrite_is_refused_and_the_first_stays(s3, models, ray_session):
    """The same merge again finds itself done (exit 0, nothing written); another merge into the
    published model is refused; either way the first model stays as it was."""
    cluster, _ = ray_session
    out = f"s3://{BUCKET}/twice/out"
    assert merge("--base", models.base, "--adapter", models.adapter, "--output", out,
                 "--ray-address", cluster.address).returncode == 0
    client = s3.client()
    before = {n: client.head_object(Bucket=BUCKET, Key=f"twice/out/{n}")["ETag"] for n in list_keys(s3, "twice/out")}
    again = merge("--base", models.base, "--adapter", models.adapter, "--output", out)
    assert again.returncode == 0 and again.stdout.startswith(f"{out}: already complete"), again.stderr
    other = merge("--base", models.base, "--adapter", models.adapter, "--weight", "0.5", "--output", out)
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1] == (
        f"error: {out}/{INDEX_NAME}: the output already holds a finished model of other inputs or settings "
        "(pass --overwrite to replace it, or choose another --output)")
    after = {n: client.head_object(Bucket=BUCKET, Key=f"twice/out/{n}")["ETag"] for n in list_keys(s3, "twice/out")}
    assert after == before


def test_wrong_credentials_are_bad_input(s3, models, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + SENTINEL_SECRET[::-1])
    run = merge("--base", models.base, "--adapter", models.adapter, "--output", f"s3://{BUCKET}/denied/out")
    assert run.returncode == 2
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: s3://{BUCKET}/denied/out (") and "): access denied (403) (check the AWS " \
        "credentials and the bucket policy)" in line, line


def test_the_secret_key_never_appears_in_output_logs_or_errors(s3, ray_session, tmp_path):
    """Runs last in this module: looks through everything the runs above produced."""
    cluster, _ = ray_session
    assert len(RUNS) >= 7
    for run in RUNS:
        assert SENTINEL_SECRET not in run.stdout + run.stderr
        assert SENTINEL_SECRET[::-1] not in run.stdout + run.stderr
    client = s3.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for obj in page.get("Contents", []):
            assert SENTINEL_SECRET.encode() not in client.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
    logs = glob.glob(os.path.join(cluster.head_node.get_session_dir_path(), "logs", "*"))
    assert logs, "Ray's logs are where a leaked credential would show"
    for path in logs:
        if os.path.isfile(path):
            assert SENTINEL_SECRET.encode() not in open(path, "rb").read(), path
