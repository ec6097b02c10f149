"""`lora-merge verify`: re-check an existing merged model against its base and adapters, one task
per shard (on Ray, through the executor)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from jobs.driver import ProgressCallback, executor_for, start_executor
from jobs.executor import Executor
from jobs.options import VerifyOptions
from jobs.prepare import prepare
from jobs.progress import Progress
from jobs.runner import run_over_lanes
from jobs.scheduling import plan_lanes
from jobs.tasks import verify_shard_work
from merge_core.errors import InputError
from merge_core.io.hashing import record_digest
from merge_core.io.registry import open_storage
from merge_core.names import INDEX_NAME, MANIFEST_NAME
from merge_core.publish.validate import check_config, check_headers, check_index
from merge_core.worker.job import MergeJob

if TYPE_CHECKING:
    from merge_core.publish.verify import ShardVerdict

log = logging.getLogger("lora_merge")


@dataclass(kw_only=True)
class VerifySummary:
    merged: str
    shards: int
    tensors_checked: int
    bytes_checked: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _read_json(storage, name: str) -> dict | None:
    if not storage.exists(name):
        return None
    try:
        return json.loads(storage.read_bytes(name))
    except ValueError:
        return None


def run_verify(options: VerifyOptions, executor: Executor | None = None,
               progress: ProgressCallback | None = None) -> VerifySummary:
    """Every shard re-read and every tensor merged again; the findings in the summary's problems
    (none: the merged model is what its inputs make). Bad input raises InputError."""
    executor = executor or executor_for(options)
    plan = prepare(options).plan
    merged = open_storage(options.merged, options.storage)
    index = _read_json(merged, INDEX_NAME)
    if index is None:
        raise InputError(merged.describe(INDEX_NAME), "missing or not JSON: this is not a complete merged model",
                         "point --merged at the output of a finished lora-merge run")
    manifest = _read_json(merged, MANIFEST_NAME)
    shard_records = (manifest or {}).get("output", {}).get("shards", [])
    recorded = {s["name"]: (s["size"], record_digest(s)) for s in shard_records}  # sha256 in older manifests
    # Shards fused on a GPU may differ from this CPU's recomputation by one ulp in a few elements.
    on_gpu = {s["name"] for s in shard_records if str(s.get("device", "")).startswith("cuda")}
    problems = [] if manifest else [f"{merged.describe(MANIFEST_NAME)}: missing, so shard hashes cannot be checked"]
    _, headers = check_headers(plan, merged)  # per-shard header problems come from the verify tasks
    problems += check_index(plan, index, headers) + check_config(plan, merged)

    executor = start_executor(executor)
    lanes = plan_lanes(executor.nodes(), options.device if options.device != "cuda" else "auto")
    shown = Progress(len(plan.tasks), plan.write_bytes, callback=progress)

    job = MergeJob.of(plan, merged.uri, storage=options.storage)

    def submit(task, lane_options):
        size, sha = recorded.get(task.name, (None, None))
        return executor.submit(verify_shard_work, (task, job, size, sha, 1 if task.name in on_gpu else 0),
                               lane_options)

    def done(task, verdict: ShardVerdict):
        shown.shard_done(verdict.name, verdict.size, f"{verdict.tensors_checked} tensors checked, "
                         f"{len(verdict.problems)} problems")

    try:
        outcome = run_over_lanes(executor, plan.tasks, lanes, submit, lambda t: t.name, done, shown)
    finally:
        shown.close()
    verdicts = sorted(outcome.results, key=lambda v: v.name)
    problems += [p for v in verdicts for p in v.problems]
    if recorded and set(recorded) != {t.name for t in plan.tasks}:
        problems.append(f"{merged.describe(MANIFEST_NAME)}: records shards {sorted(recorded)} but the base has "
                        f"{sorted(t.name for t in plan.tasks)}")
    return VerifySummary(merged=merged.uri, shards=len(plan.tasks),
                         tensors_checked=sum(v.tensors_checked for v in verdicts),
                         bytes_checked=sum(v.size for v in verdicts), problems=problems)
