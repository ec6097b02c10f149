"""The resume journal: which shards of an unfinished merge are done, and what they hashed to.

The driver rewrites it after every finished shard. A later `--resume` run reuses a shard only
if the journal was written for the very same inputs (the fingerprint) and storage still holds
exactly the recorded bytes (size and sha256 re-read); everything else is merged again. It is
removed once the index is published.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Mapping, Sequence

from merge_core.errors import InputError, ValidationError
from merge_core.io.pipeline import sha256_of
from merge_core.io.storage import Storage
from merge_core.names import JOURNAL_NAME
from merge_core.numerics.stats import FuseStats
from merge_core.planning.plan import MergePlan
from merge_core.publish.manifest import tool_version
from merge_core.worker.shard_result import ShardResult, check_stored


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
        "arithmetic": plan.arithmetic,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=list).encode()).hexdigest()


def _result_from_dict(record: Mapping[str, object]) -> ShardResult:
    fields = dict(record)
    fields["fused_stats"] = tuple((name, FuseStats(**stats)) for name, stats in fields.get("fused_stats", ()))
    return ShardResult(**fields)


def write_journal(storage: Storage, print_: str, results: Sequence[ShardResult]) -> None:
    body = {"fingerprint": print_, "shards": [dataclasses.asdict(r) for r in results]}
    storage.write_bytes(JOURNAL_NAME, json.dumps(body).encode())


def read_journal(storage: Storage, print_: str) -> list[ShardResult]:
    """The journal's shards; an InputError if there is none, or it belongs to another merge."""
    where = storage.describe(JOURNAL_NAME)
    if not storage.exists(JOURNAL_NAME):
        raise InputError(where, "nothing to resume: this output has no journal of a lora-merge run",
                         "pass --overwrite to start over")
    try:
        body = json.loads(storage.read_bytes(JOURNAL_NAME))
        results = [_result_from_dict(r) for r in body["shards"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(where, f"unreadable journal ({exc})", "pass --overwrite to start over") from None
    if body.get("fingerprint") != print_:
        raise InputError(where, "the unfinished merge here had other inputs or settings",
                         "resume with the same --base, --adapter and --weight, or pass --overwrite")
    return results


def proven(storage: Storage, base: Storage, results: Sequence[ShardResult], plan: MergePlan) -> list[ShardResult]:
    """The journal's shards that storage still holds byte for byte, merged from the base as it is now."""
    tasks = {t.name: t for t in plan.tasks}
    kept = []
    for result in results:
        if result.name not in tasks:
            continue
        try:
            check_stored(storage, tasks[result.name].output_name, result.size, result.sha256)
            if sha256_of(base, result.name, tasks[result.name].shard.size) != result.base_sha256:
                continue  # the base changed since: this shard was merged from other bytes
        except (ValidationError, FileNotFoundError):
            continue
        kept.append(result)
    return kept
