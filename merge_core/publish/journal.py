"""The resume journal: which merge an output belongs to, which of its shards are done, and what
they hashed to; and the test-only pause points that hold a run in each window it can die in.

The driver writes it before any task can write to the output (so an interrupted run of the same
merge is always recognised, whenever it stopped) and rewrites it after every finished shard. A
later `--resume` run reuses a shard only if the journal was written for the very same inputs (the
fingerprint) and storage still holds exactly the recorded bytes (size and digest re-read);
everything else is merged again. The final task publishes only while the journal vouches for the
shards it is publishing, and removes it once the index is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Mapping, Sequence

from merge_core.errors import InputError, ValidationError
from merge_core.io.hashing import algorithm_of, record_digest, tagged
from merge_core.io.pipeline import digest_of
from merge_core.io.storage import Storage
from merge_core.names import JOURNAL_NAME
from merge_core.numerics.stats import FuseStats
from merge_core.planning.plan import MergePlan
from merge_core.publish.manifest import tool_version
from merge_core.worker.shard_result import ShardResult, check_stored

# Tests only: "POINT[,POINT...]:DIR" holds the first process to reach POINT (see pause_point).
PAUSE_ENV = "LORA_MERGE_TEST_PAUSE"
PAUSE_LIMIT_SECONDS = 300  # a test that never comes back must not leave a run held for ever


@dataclasses.dataclass(frozen=True)
class Journal:
    fingerprint: str
    shards: tuple[ShardResult, ...] = ()
    # An --overwrite had begun removing the old output: a --resume finishes that first, or stale
    # files of the old model (a model.safetensors, which loaders prefer to the index) would stay.
    clearing: bool = False


def fingerprint(plan: MergePlan, adapter_sha256: Sequence[str], settings: Mapping[str, object]) -> str:
    """Identifies the merge: base layout, adapters' bytes, what is fused with which scale, settings."""
    described = {
        "tool": tool_version(),
        "base_uri": plan.base_uri,
        "base": [(t.name, t.shard.size, [(i.name, i.dtype, i.shape, i.start) for i in t.shard.header.tensors])
                 for t in plan.tasks],
        "adapters": list(adapter_sha256),
        "updates": [(f.tensor, f.source, [(u.adapter, u.kind, u.scale, u.weight, u.transpose, u.side,
                                           dataclasses.asdict(u.experts) if u.experts else None)
                                          for u in f.updates]) for t in plan.tasks for f in t.targets],
        "output": [t.output_tensors for t in plan.tasks],
        "settings": dict(settings),
        "arithmetic": plan.arithmetic.as_json(),
        "scales": plan.scales,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=list).encode()).hexdigest()


def _result_from_dict(record: Mapping[str, object]) -> ShardResult:
    fields = dict(record)
    for old, new in (("sha256", "digest"), ("base_sha256", "base_digest")):  # a journal from before the choice
        if old in fields:
            fields[new] = tagged("sha256", fields.pop(old))
    fields["fused_stats"] = tuple((name, FuseStats(**stats)) for name, stats in fields.get("fused_stats", ()))
    return ShardResult(**fields)


def write_journal(storage: Storage, print_: str, results: Sequence[ShardResult], clearing: bool = False) -> None:
    body = {"fingerprint": print_, "shards": [dataclasses.asdict(r) for r in results], "clearing": clearing}
    storage.write_bytes(JOURNAL_NAME, json.dumps(body).encode())


def _load(storage: Storage) -> Journal:
    """The journal as stored; ValueError, KeyError or TypeError if it is not one."""
    body = json.loads(storage.read_bytes(JOURNAL_NAME))
    return Journal(body["fingerprint"], tuple(_result_from_dict(r) for r in body["shards"]),
                   bool(body.get("clearing", False)))


def read_journal(storage: Storage, print_: str) -> Journal:
    """The journal; an InputError if there is none, or it belongs to another merge."""
    where = storage.describe(JOURNAL_NAME)
    if not storage.exists(JOURNAL_NAME):
        raise InputError(where, "nothing to resume: this output has no journal of a lora-merge run",
                         "pass --overwrite to start over")
    try:
        journal = _load(storage)
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(where, f"unreadable journal ({exc})", "pass --overwrite to start over") from None
    if journal.fingerprint != print_:
        raise InputError(where, "the unfinished merge here had other inputs or settings",
                         "resume with the same --base, --adapter and --weight, or pass --overwrite")
    return journal


def vouches_for(storage: Storage, shards: Sequence[Mapping[str, object]]) -> bool:
    """Whether the stored journal records each of `shards` (manifest records: name and digest) with
    the same digest.
    A final task whose driver died and whose output a newer run has since claimed (that run's
    journal holds only what it proved) finds it does not, and must leave the output alone."""
    if not shards:
        return True
    try:
        recorded = {r.name: r.digest for r in _load(storage).shards}
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return False
    return all(recorded.get(s["name"]) == record_digest(s) for s in shards)


def proven(storage: Storage, base: Storage, results: Sequence[ShardResult], plan: MergePlan) -> list[ShardResult]:
    """The journal's shards that storage still holds byte for byte, merged from the base as it is now."""
    tasks = {t.name: t for t in plan.tasks}
    kept = []
    for result in results:
        if result.name not in tasks:
            continue
        try:
            check_stored(storage, tasks[result.name].output_name, result.size, result.digest)
            size = tasks[result.name].shard.size
            if digest_of(base, result.name, size, algorithm_of(result.base_digest)) != result.base_digest:
                continue  # the base changed since: this shard was merged from other bytes
        except (ValidationError, FileNotFoundError):
            continue
        kept.append(result)
    return kept


def pause_point(point: str) -> None:
    """Tests only, to stop a run in one precise window (a SIGKILL can come at any moment; a test
    must hit each one): with LORA_MERGE_TEST_PAUSE=POINT[,POINT...]:DIR, the first process to
    reach POINT creates DIR/POINT.paused and waits until DIR/POINT.go exists; later arrivals (a
    retried task) pass. Unset, it costs one environment lookup."""
    wanted = os.environ.get(PAUSE_ENV)
    if not wanted:
        return
    points, _, directory = wanted.partition(":")
    if point not in points.split(","):
        return
    try:
        os.close(os.open(os.path.join(directory, f"{point}.paused"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    deadline = time.monotonic() + PAUSE_LIMIT_SECONDS
    while not os.path.exists(os.path.join(directory, f"{point}.go")) and time.monotonic() < deadline:
        time.sleep(0.02)
