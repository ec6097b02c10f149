"""The resume journal reuses only shards proven against the same inputs, and the final task publishes
only what it vouches for."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time

import pytest

from merge_core.errors import InputError
from merge_core.inputs.adapter import load_adapter
from merge_core.inputs.checkpoint import load_base
from merge_core.io.hashing import hex_of, record_digest, record_fields
from merge_core.io.local import LocalStorage
from merge_core.io.pipeline import digest_of
from merge_core.names import INDEX_NAME, JOURNAL_NAME, MANIFEST_NAME
from merge_core.planning.planner import plan_merge
from merge_core.publish.finalize import build_index, publish
from merge_core.publish.journal import (
    PAUSE_ENV,
    Journal,
    fingerprint,
    pause_point,
    proven,
    read_journal,
    vouches_for,
    write_journal,
)
from merge_core.publish.verify import verify_shard
from merge_core.worker.job import MergeJob
from merge_core.worker.shard_merge import merge_shard
from tests.reference import make_adapter, make_base


def test_shards_of_another_base_with_the_same_layout_are_not_reused(tmp_path):
    base = make_base(str(tmp_path / "base"), seed=0)
    other = make_base(str(tmp_path / "other"), seed=5)  # same architecture, other weights
    adapter = make_adapter(str(tmp_path / "adapter"))
    out = LocalStorage(str(tmp_path / "out"))
    plan = plan_merge(load_base(LocalStorage(base)), [load_adapter(LocalStorage(adapter))], [1.0])
    results = [merge_shard(t, MergeJob.of(plan, out.root)) for t in plan.tasks]
    key = fingerprint(plan, ["a"], {})
    write_journal(out, key, results)
    assert [r.name for r in proven(out, LocalStorage(base), read_journal(out, key).shards, plan)] == \
        [t.name for t in plan.tasks]

    # The other checkpoint, copied over the base: same names, sizes and layout, other bytes.
    for name in os.listdir(other):
        shutil.copy(os.path.join(other, name), os.path.join(base, name))
    plan_now = plan_merge(load_base(LocalStorage(base)), [load_adapter(LocalStorage(adapter))], [1.0])
    assert fingerprint(plan_now, ["a"], {}) == key, "layout alone cannot tell them apart"
    assert proven(out, LocalStorage(base), read_journal(out, key).shards, plan_now) == []


def test_a_journal_of_other_settings_is_refused(tmp_path):
    out = LocalStorage(str(tmp_path))
    write_journal(out, "one", [])
    with pytest.raises(InputError, match="the unfinished merge here had other inputs or settings"):
        read_journal(out, "two")
    with pytest.raises(InputError, match="nothing to resume"):
        read_journal(LocalStorage(str(tmp_path / "empty")), "one")


def merged_shards(tmp_path):
    """A small merge's plan, its shards written to tmp_path/out, their results and an index."""
    base = make_base(str(tmp_path / "base"))
    checkpoint = load_base(LocalStorage(base))
    plan = plan_merge(checkpoint, [load_adapter(LocalStorage(make_adapter(str(tmp_path / "adapter"))))], [1.0])
    out = LocalStorage(str(tmp_path / "out"))
    results = [merge_shard(t, MergeJob.of(plan, out.root)) for t in plan.tasks]
    manifest = {"output": {"shards": [{"name": r.name} | record_fields(r.digest) for r in results]}}
    return plan, out, results, build_index(plan, checkpoint.index_metadata)[0], manifest


def test_journal_records_an_unfinished_clear_and_vouches_only_for_same_bytes(tmp_path):
    out = LocalStorage(str(tmp_path))
    write_journal(out, "key", [], clearing=True)
    assert read_journal(out, "key") == Journal("key", (), clearing=True)
    assert vouches_for(out, []) and not vouches_for(out, [{"name": "a", "sha256": "1"}])
    assert not vouches_for(LocalStorage(str(tmp_path / "none")), [{"name": "a", "sha256": "1"}])


def test_publish_leaves_an_output_another_run_has_claimed_alone(tmp_path):
    """A final task whose driver died finds the journal of the run that took over: it must neither
    abort that run's uploads nor put its index over that run's work."""
    plan, out, results, index, manifest = merged_shards(tmp_path)
    write_journal(out, "key", results[:1])  # the newer run proved one shard so far
    in_flight = out.open_writer(results[1].name)  # and is rewriting another
    in_flight.write(b"x")
    with pytest.raises(RuntimeError, match="another run has taken over this output since this one started"):
        publish(out, plan, index, manifest, b"")
    assert not out.exists(INDEX_NAME) and not out.exists(MANIFEST_NAME)
    assert [n for n in os.listdir(out.root) if n.endswith(".partial")], "the other run's upload was left alone"
    in_flight.abort()


def test_a_retried_publish_knows_its_own_index_and_refuses_another_jobs(tmp_path):
    plan, out, results, index, manifest = merged_shards(tmp_path)
    write_journal(out, "key", results)
    publish(out, plan, index, manifest, b"")
    assert out.exists(INDEX_NAME) and not out.exists(JOURNAL_NAME)
    publish(out, plan, index, manifest, b"")  # the worker died after the index; the retry finds it
    other = {"output": {"shards": [{"name": r.name, "blake3": "0" * 64} for r in results]}}
    with pytest.raises(RuntimeError, match="another job published a model here while this one ran"):
        publish(out, plan, index, other, b"")


def test_pause_point_holds_the_first_arrival_until_released(tmp_path, monkeypatch):
    pause_point("somewhere")  # unset: returns at once
    monkeypatch.setenv(PAUSE_ENV, f"elsewhere,somewhere:{tmp_path}")
    held = threading.Thread(target=pause_point, args=("somewhere",))
    held.start()
    deadline = time.monotonic() + 10
    while not (tmp_path / "somewhere.paused").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    held.join(0.2)
    assert held.is_alive(), "held until released"
    (tmp_path / "somewhere.go").touch()
    held.join(10)
    assert not held.is_alive()
    pause_point("somewhere")  # a later arrival (a retried task) passes
    pause_point("nowhere")


def test_a_journal_and_a_manifest_written_with_sha256_are_still_recognized(tmp_path):
    """Every record before BLAKE3 was the default holds sha256 under "sha256" (and "base_sha256"):
    --resume reuses its shards, the final task and verify check them with sha256."""
    plan, out, results, index, _ = merged_shards(tmp_path)
    base = LocalStorage(str(tmp_path / "base"))
    old = []
    for r in results:
        record = dataclasses.asdict(r)
        del record["digest"], record["base_digest"]
        old.append(record | {"sha256": hex_of(digest_of(out, r.name, r.size, "sha256")),
                             "base_sha256": hex_of(digest_of(base, r.name, base.size(r.name), "sha256"))})
    out.write_bytes(JOURNAL_NAME, json.dumps({"fingerprint": "key", "shards": old}).encode())
    journal = read_journal(out, "key")
    assert [r.digest for r in journal.shards] == [f"sha256:{r['sha256']}" for r in old]
    assert [r.name for r in proven(out, base, journal.shards, plan)] == [t.name for t in plan.tasks]
    manifest = {"output": {"shards": [{"name": r["name"], "size": r["size"], "sha256": r["sha256"]} for r in old]}}
    assert vouches_for(out, manifest["output"]["shards"])
    for task, r in zip(plan.tasks, old):
        verdict = verify_shard(task, MergeJob.of(plan, out.root), r["size"], record_digest(r))
        assert not verdict.problems and verdict.digest == record_digest(r), verdict.problems
    publish(out, plan, index, manifest, b"")
    publish(out, plan, index, manifest, b"")  # a retry finds its own index, recorded in sha256
    assert out.exists(INDEX_NAME)
