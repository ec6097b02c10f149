"""One output of a run, from its checks to its publication: the unit a merge has one of and a
batch has several of, each with its own claim (jobs/lease.py), journal (jobs/claim.py), plan,
final task, manifest and report.

    out = open_output(options, run, lease)     # checks, plan, fingerprint: nothing written
    if out.summary: ...                         # already complete: this very merge is there
    hold_output(out)                            # the claim, then the journal, before any task writes
    ...                                         # the shard tasks (jobs/driver.py, jobs/batch.py)
    summary = publish_output(out, executor, lanes, retries, reasons)   # the final task: index last
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from jobs.claim import Run, already_complete, check_output, claim, read_manifest, resumable, tidy
from jobs.executor import Executor
from jobs.lease import Lease
from jobs.options import MergeOptions, UnmergeOptions
from jobs.prepare import Prepared, prepare
from jobs.runner import get_with_retries
from jobs.tasks import finalize_work
from merge_core.errors import InputError, TransientStorageError
from merge_core.inputs.adapter import LoraAdapter
from merge_core.inputs.adapter_files import scan_adapter
from merge_core.inputs.checkpoint import BaseCheckpoint
from merge_core.io.hashing import hex_of
from merge_core.io.pipeline import digest_of
from merge_core.io.registry import open_storage
from merge_core.io.storage import Storage, StorageOptions
from merge_core.names import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    INDEX_NAME,
    MANIFEST_NAME,
    SINGLE_NAME,
    STAGING_DIR,
)
from merge_core.publish.journal import fingerprint
from merge_core.publish.lineage import check_not_merged_twice, unrecorded, weights_sha256
from merge_core.publish.manifest import adapter_record
from merge_core.publish.publication import Publication
from merge_core.worker.job import MergeJob
from merge_core.worker.shard_result import ShardResult

log = logging.getLogger("lora_merge")


@dataclass(kw_only=True)
class MergeSummary:
    """What a merge (or unmerge) did: the summary the command prints, and the manifest it published."""
    output: str
    shards: int
    tensors: int
    fused_tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    device: str
    retries: int = 0
    reused: int = 0  # shards --resume took from the interrupted run
    validated: bool = True
    nodes: list[str] = field(default_factory=list)
    manifest: dict = field(default_factory=dict, repr=False)
    adapter_kept: str | None = None  # a quantized base: what the stored weights kept of the update
    pictures: list[str] = field(default_factory=list)  # where report_png drew the heatmap

    adapters: list[dict] = field(default_factory=list)  # each adapter's URI and weight, in order
    already_complete: bool = False  # the output held this very merge, finished: nothing was done

    @property
    def gb_per_second(self) -> float:
        return self.bytes_written / self.seconds / 1e9 if self.seconds else 0.0

    def as_dict(self) -> dict:
        """The summary as --report and --log-format json write it (the manifest apart)."""
        return {k: v for k, v in vars(self).items() if k != "manifest"} | {
            "gb_per_second": self.gb_per_second, "timings": self.manifest.get("timings", {})}


@dataclass(kw_only=True)
class OutputRun:
    """One output: its options, its claim and journal, its plan, and, once it ends, its summary."""
    options: MergeOptions
    run: Run
    lease: Lease
    started: float = field(default_factory=time.perf_counter)
    prepared: Prepared | None = None
    records: list[dict] = field(default_factory=list)
    reused: list[ShardResult] = field(default_factory=list)
    clearing: bool = False
    planned: float = 0.0
    ready: float = 0.0  # the executor started: Ray up (a local one) or joined
    job: MergeJob | None = None
    original: str | None = None
    summary: MergeSummary | None = None

    @property
    def uri(self) -> str:
        return self.run.output.uri

    @property
    def plan(self):
        return self.prepared.plan

    def adapters(self) -> list[dict]:
        return [{"uri": uri, "weight": w} for uri, w in zip(self.options.adapters, self.prepared.weights)]


def open_output(options: MergeOptions, run: Run, lease: Lease, base: BaseCheckpoint | None = None) -> OutputRun:
    """Check the output (refused if another job holds it, or it holds what this run may not
    touch), read and check the inputs, plan, and find what an interrupted run left (--resume).
    Nothing is written but a pickle-only adapter's staged copy (--allow-pickle). An output
    holding this very merge, finished, comes back with its summary: nothing to do."""
    output = run.output
    lease.refuse_live()  # another job writing here now: refused at once
    finished = check_output(output, options)
    if not finished:  # a finished model may be this very merge, whoever wrote it (already_complete)
        output.check_writable()
        lease.check(may_take_over=options.resume or options.overwrite)
    out = OutputRun(options=options, run=run, lease=lease)
    out.prepared, out.records = _check_and_plan(output, options, base)
    run.key = fingerprint(out.plan, [weights_sha256(r) for r in out.records],
                          {"allow_nonfinite": options.allow_nonfinite, "validate": options.validate,
                           "digest": options.digest})
    if finished and already_complete(output, options, run.key):
        out.summary = _done_before(out)
        return out
    run.total = len(out.plan.tasks)
    out.reused, out.clearing = resumable(output, options, out.plan, run.key)
    out.planned = time.perf_counter()
    return out


def hold_output(out: OutputRun) -> None:
    """Claim the output (its first write), record the run in its journal, and make the job its
    tasks share."""
    options = out.options
    out.lease.take(may_take_over=options.resume or options.overwrite)
    claim(out.run, options, out.reused, out.clearing)
    out.original = _original(options, out.plan, out.prepared.base)
    out.job = MergeJob.of(out.plan, out.uri, storage=options.storage, device=options.device,
                          allow_nonfinite=options.allow_nonfinite, read_back=options.validate, digest=options.digest,
                          original_uri=out.original)


def publish_output(out: OutputRun, executor: Executor, lanes, retries: Mapping[str, int],
                   reasons: Mapping[str, Sequence[str]], merged: float, name: str = "the final task") -> MergeSummary:
    """The final task (validation, the other files, the manifest, the report, the index last),
    retried when a retry may cure it (logged as `name`); then the output's summary."""
    run, plan, options = out.run, out.plan, out.options
    run.record()  # current before the final task, which publishes only what the journal vouches for
    results = run.done
    cluster = {"resources": executor.resources(), "nodes": len([n for n in executor.nodes() if n.get("Alive")]),
               "lanes": {lane.name: lane.slots for lane in lanes}, "executor": executor.name}
    publication = Publication(results=tuple(results), extra_files=out.prepared.base.extra_files,
                              index_metadata=out.prepared.base.index_metadata, adapter_records=tuple(out.records),
                              timings={"plan_seconds": out.planned - out.started,
                                       "start_seconds": max(0.0, out.ready - out.planned),
                                       "merge_seconds": merged - max(out.ready, out.planned)},
                              cluster=cluster, retries=dict(retries),
                              retry_reasons={k: tuple(v) for k, v in reasons.items()},
                              reused=tuple(r.name for r in out.reused), lineage=out.prepared.base.manifest,
                              original_uri=out.original, fingerprint=run.key)
    try:
        manifest = get_with_retries(executor, lambda before: executor.submit(
            finalize_work, (plan, out.job, dataclasses.replace(publication, final_retries=tuple(before))), {}),
            name)
    except BaseException:
        tidy(run, record=False)  # the journal is current, and must not come back once the index is there
        raise
    if options.allow_pickle:
        remove_staging(run.output, options.storage)
    reused = {u.name for u in out.reused}
    return MergeSummary(output=out.uri, shards=len(plan.tasks), tensors=sum(r.tensors for r in results),
                        fused_tensors=plan.fused_tensor_count, bytes_read=plan.read_bytes,
                        bytes_written=sum(r.size for r in results), seconds=time.perf_counter() - out.started,
                        device=",".join(sorted({r.device for r in results})), retries=sum(retries.values()),
                        reused=len(out.reused), validated=options.validate, manifest=manifest,
                        # the nodes of this run: a reused shard was merged where the interrupted run ran
                        nodes=sorted({r.node for r in results if r.name not in reused}), adapters=out.adapters())


def remove_staging(output: Storage, options: StorageOptions) -> None:
    open_storage(f"{output.uri}/{STAGING_DIR}", options).remove_tree()


def _adapter_record(adapter: LoraAdapter, weight: float, given_as: str, storage: StorageOptions) -> dict:
    """The manifest's record of an adapter, with its files' sizes and sha256 (the weights read
    whole, which also proves them finite). Adapters keep sha256 whatever --digest says: it is their
    identity in every manifest's lineage (the double-merge guard), and they are small beside a base."""
    files = open_storage(adapter.uri, storage)
    config_size = files.size(ADAPTER_CONFIG_NAME)
    hashed = [{"name": ADAPTER_CONFIG_NAME, "size": config_size,
               "sha256": hex_of(digest_of(files, ADAPTER_CONFIG_NAME, config_size, "sha256"))},
              {"name": ADAPTER_WEIGHTS_NAME, "size": files.size(ADAPTER_WEIGHTS_NAME),
               "sha256": scan_adapter(files, adapter)}]
    return adapter_record(adapter, weight, hashed) | {"given_as": given_as}


def _done_before(out: OutputRun) -> MergeSummary:
    """The summary of a merge found complete in its output: nothing was run or written."""
    manifest = read_manifest(out.run.output) or {}
    shards = manifest.get("output", {}).get("shards", [])
    return MergeSummary(output=out.uri, shards=len(shards), tensors=sum(s.get("tensors", 0) for s in shards),
                        fused_tensors=out.plan.fused_tensor_count, bytes_read=0, bytes_written=0,
                        seconds=time.perf_counter() - out.started, device="-", reused=len(shards),
                        validated=out.options.validate, manifest=manifest, already_complete=True,
                        adapters=out.adapters())


def _check_history(base: BaseCheckpoint, records: list[dict], options: MergeOptions) -> None:
    """A merge of an adapter the base already holds is refused (--allow-remerge); an unmerge of one
    it does not hold warns (refused with --strict)."""
    if not options.unmerge:
        check_not_merged_twice(base.uri, base.manifest, records, options.allow_remerge)
        return
    if base.manifest is None:
        log.warning("%s has no %s: whether it holds the adapters cannot be checked", base.uri, MANIFEST_NAME)
        return
    what = f"is not merged into {base.uri}: its {MANIFEST_NAME} does not record these weights"
    missing = unrecorded(base.manifest, records)
    if missing and isinstance(options, UnmergeOptions) and options.strict:
        raise InputError(missing[0], what, "unmerge the adapter that was merged, or drop --strict")
    for uri in missing:
        log.warning("%s %s; unmerging it anyway", uri, what)


def _original(options: MergeOptions, plan, base: BaseCheckpoint) -> str | None:
    """The original base an unmerge is compared with (and, given as --base, restores DoRA and copies
    from): --base, else the one the merged model's manifest records, when it is still there."""
    if not options.unmerge:
        return None
    given = options.original_base if isinstance(options, UnmergeOptions) else None
    candidate = given or (base.manifest or {}).get("base", {}).get("uri")
    if not candidate:
        return None
    try:
        original = open_storage(candidate, options.storage)
        names = set(original.list_names())
    except (InputError, TransientStorageError, OSError):
        names = set()
    if names & {INDEX_NAME, SINGLE_NAME}:  # its tensors are found through its own index
        return original.uri
    if given:
        raise InputError(given, f"holds no {INDEX_NAME} or {SINGLE_NAME}",
                         "give the base the merged model was made from")
    log.info("the original base %s is not there any more: the unmerge is not compared with it", candidate)
    return None


def _check_and_plan(output: Storage, options: MergeOptions,
                    base: BaseCheckpoint | None) -> tuple[Prepared, list[dict]]:
    """Every input read and checked, the plan made, the adapters hashed; nothing written but the
    staged copy of a pickle-only adapter (--allow-pickle), removed again on failure."""
    staging = f"{output.uri}/{STAGING_DIR}" if options.allow_pickle else None
    try:
        prepared = prepare(options, staging, base)
        plan = prepared.plan
        if plan.model_changes["resized_tensors"] and not plan.file_sources:
            log.warning("the adapter resizes the vocabulary but has no tokenizer files beside it: the base's "
                        "tokenizer is copied; ship the tokenizer with the new tokens with the merged model")
        output.check_object_size(max(t.shard.size for t in plan.tasks))
        records = [_adapter_record(a, w, uri, options.storage)
                   for a, w, uri in zip(prepared.adapters, prepared.weights, options.adapters)]
        _check_history(prepared.base, records, options)
    except BaseException:
        if staging:
            remove_staging(output, options.storage)
        raise
    return prepared, records
