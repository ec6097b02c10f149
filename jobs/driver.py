"""The merge driver: check every input up front, plan, run one task per shard (on Ray, through
the executor), then publish."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from jobs.claim import Run, already_complete, check_output, claim, interrupted, read_manifest, resumable, tidy
from jobs.executor import Executor
from jobs.lease import Lease
from jobs.options import MergeInputs, MergeOptions, UnmergeOptions
from jobs.progress import Progress, ProgressEvent, plural, size_text
from jobs.runner import get_with_retries, reclaim_signals, run_over_lanes, stop_signals
from jobs.scheduling import check_fits, plan_lanes
from jobs.tasks import finalize_work, merge_shard_work
from merge_core.errors import InputError, TransientStorageError
from merge_core.inputs.adapter import LoraAdapter, load_adapter
from merge_core.inputs.adapter_files import scan_adapter, stage_pickled_adapter
from merge_core.inputs.checkpoint import BaseCheckpoint, load_base
from merge_core.io.pipeline import sha256_of
from merge_core.io.registry import open_storage
from merge_core.io.storage import Storage, StorageOptions
from merge_core.names import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_PICKLE_NAME,
    ADAPTER_WEIGHTS_NAME,
    INDEX_NAME,
    MANIFEST_NAME,
    SINGLE_NAME,
    STAGING_DIR,
)
from merge_core.planning.plan import MergePlan
from merge_core.planning.planner import plan_merge
from merge_core.publish.journal import fingerprint, pause_point
from merge_core.publish.lineage import check_not_merged_twice, unrecorded
from merge_core.publish.manifest import adapter_record
from merge_core.publish.publication import Publication
from merge_core.worker.job import MergeJob
from merge_core.worker.shard_result import ShardResult

log = logging.getLogger("lora_merge")
DEVICES = ("auto", "cpu", "cuda")
ProgressCallback = Callable[[ProgressEvent], None]


@dataclass(frozen=True)
class Prepared:
    base: BaseCheckpoint
    adapters: tuple[LoraAdapter, ...]
    weights: tuple[float, ...]
    plan: MergePlan


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


def prepare(inputs: MergeInputs, pickle_staging: str | None = None) -> Prepared:
    """Read and check every input, and plan: everything that can be refused is refused here.
    With pickle_staging (a URI), pickle-only adapters are converted there (--allow-pickle)."""
    if inputs.device not in DEVICES:
        raise InputError("--device", f"unknown device {inputs.device!r}", f"use one of {', '.join(DEVICES)}")
    if not inputs.adapters:
        raise InputError("--adapter", "no adapter given", "pass at least one --adapter")
    weights = tuple(inputs.weights) or (1.0,) * len(inputs.adapters)
    base = load_base(open_storage(inputs.checkpoint, inputs.storage))
    adapters = []
    for number, uri in enumerate(inputs.adapters):
        storage = open_storage(uri, inputs.storage)
        if pickle_staging and not storage.exists(ADAPTER_WEIGHTS_NAME) and storage.exists(ADAPTER_PICKLE_NAME):
            staged = open_storage(f"{pickle_staging}/adapter-{number}", inputs.storage)
            stage_pickled_adapter(storage, staged)
            storage = staged
        adapters.append(load_adapter(storage))
    restorable = bool(getattr(inputs, "original_base", None))  # unmerge --base: DoRA and copies restored from it
    plan = plan_merge(base, adapters, weights, inputs.arithmetic, allow_base_mismatch=inputs.allow_base_mismatch,
                      dequantize=inputs.dequantize, restorable=restorable, scales=inputs.scales)
    _warn_surprises(base, adapters, weights)
    return Prepared(base, tuple(adapters), weights, plan)


def _last_part(name: str) -> str:
    return str(name).rstrip("/").rsplit("/", 1)[-1].lower()


def _warn_surprises(base: BaseCheckpoint, adapters, weights) -> None:
    """What is allowed but rarely meant: an adapter weighted 0, an adapter whose config names
    another model than the base (the shapes fit, so nothing else would tell)."""
    base_names = {_last_part(base.uri), _last_part(base.config.get("_name_or_path", "") or "")} - {""}
    for adapter, weight in zip(adapters, weights):
        if weight == 0:
            log.warning("%s has weight 0, so it changes nothing: drop it, or give it another --weight", adapter.uri)
        trained_on = adapter.config.get("base_model_name_or_path")
        if trained_on and _last_part(trained_on) not in base_names:
            log.warning("%s was trained on %r (its %s), and the base is %s: merge it only into that model's weights",
                        adapter.uri, trained_on, ADAPTER_CONFIG_NAME, base.uri)


def _remove_staging(output: Storage, options: StorageOptions) -> None:
    open_storage(f"{output.uri}/{STAGING_DIR}", options).remove_tree()


def start_executor(executor: Executor | None, address: str | None) -> Executor:
    """The executor a job runs on, started: the one given, else Ray (the cluster at `address`, or a
    local one)."""
    if executor is None:
        from jobs.ray_executor import RayExecutor  # here: `plan` and in-process runs never load Ray

        executor = RayExecutor(address)
    executor.start()
    reclaim_signals()
    return executor


def _adapter_record(adapter: LoraAdapter, weight: float, given_as: str, storage: StorageOptions) -> dict:
    """The manifest's record of an adapter, with its files' sizes and sha256 (the weights read
    whole, which also proves them finite)."""
    files = open_storage(adapter.uri, storage)
    config_size = files.size(ADAPTER_CONFIG_NAME)
    hashed = [{"name": ADAPTER_CONFIG_NAME, "size": config_size,
               "sha256": sha256_of(files, ADAPTER_CONFIG_NAME, config_size)},
              {"name": ADAPTER_WEIGHTS_NAME, "size": files.size(ADAPTER_WEIGHTS_NAME),
               "sha256": scan_adapter(files, adapter)}]
    return adapter_record(adapter, weight, hashed) | {"given_as": given_as}


def _weights_sha256(record: dict) -> str:
    return next(f["sha256"] for f in record["files"] if f["name"] == ADAPTER_WEIGHTS_NAME)


def _done_before(output: Storage, options: MergeOptions, prepared: Prepared, started: float) -> MergeSummary:
    """The summary of a merge found complete in its output: nothing was run or written."""
    manifest = read_manifest(output) or {}
    shards = manifest.get("output", {}).get("shards", [])
    return MergeSummary(output=output.uri, shards=len(shards), tensors=sum(s.get("tensors", 0) for s in shards),
                        fused_tensors=prepared.plan.fused_tensor_count, bytes_read=0, bytes_written=0,
                        seconds=time.perf_counter() - started, device="-", reused=len(shards),
                        validated=options.validate, manifest=manifest, already_complete=True,
                        adapters=[{"uri": u, "weight": w} for u, w in zip(options.adapters, prepared.weights)])


def _describe(result: ShardResult) -> str:
    return (f"{plural(result.fused, 'tensor')} fused, {result.seconds:.2f} s on node {result.node[:8]} "
            f"({result.device}), "
            f"fuse {result.fuse_seconds:.2f} s, waiting on reads {result.read_wait_seconds:.2f} s")


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


def _original(options: MergeOptions, plan: MergePlan, base: BaseCheckpoint) -> str | None:
    """The original base an unmerge is compared with (and, given as --base, restores DoRA and copies
    from): --base, else the one the merged model's manifest records, when it is still there."""
    if not options.unmerge:
        return None
    given = options.original_base if isinstance(options, UnmergeOptions) else None
    recorded = (base.manifest or {}).get("base", {}) if base.manifest else {}
    candidate = given or recorded.get("uri")
    if not candidate:
        return None
    try:
        names = set(open_storage(candidate, options.storage).list_names())
    except (InputError, TransientStorageError, OSError):
        names = set()
    if names & {INDEX_NAME, SINGLE_NAME}:  # its tensors are found through its own index
        return open_storage(candidate, options.storage).uri
    if given:
        raise InputError(given, f"holds no {INDEX_NAME} or {SINGLE_NAME}",
                         "give the base the merged model was made from")
    log.info("the original base %s is not there any more: the unmerge is not compared with it", candidate)
    return None


def _check_and_plan(output: Storage, options: MergeOptions) -> tuple[Prepared, list[dict]]:
    """Every input read and checked, the plan made, the adapters hashed; nothing written but the
    staged copy of a pickle-only adapter (--allow-pickle), removed again on failure."""
    staging = f"{output.uri}/{STAGING_DIR}" if options.allow_pickle else None
    try:
        prepared = prepare(options, staging)
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
            _remove_staging(output, options.storage)
        raise
    return prepared, records


def _run_shards(executor: Executor, plan: MergePlan, job: MergeJob, options: MergeOptions, lanes, run: Run,
                callback: ProgressCallback | None):
    """One task per shard not done yet, over the lanes, the journal rewritten after each."""
    log.info("merging %s (%s to fuse, %s) into %s", plural(len(plan.tasks), "shard"),
             plural(plan.fused_tensor_count, "tensor"), size_text(plan.write_bytes), run.output.uri)
    progress = Progress(len(plan.tasks), plan.write_bytes, callback=callback)
    for result in run.done:
        progress.shard_done(result.name, result.size, "reused from the unfinished run", reused=True)
    memory = {t.name: t.memory_bytes for t in plan.tasks}

    def finished(task, result: ShardResult) -> None:
        pause_point("shard-landed")  # tests: the shard is published, the journal does not know it yet
        run.done.append(result)
        progress.shard_done(result.name, result.size, _describe(result))
        try:
            run.record()
        except (TransientStorageError, OSError) as exc:  # it only saves a later --resume some work
            log.warning("could not update the resume journal: %s", exc)

    def submit(task, lane_options):
        return executor.submit(merge_shard_work, (task, job), dict(lane_options, memory=memory[task.name],
                                                                     resources=dict(options.task_resources) or None))

    done = {r.name for r in run.done}
    try:
        outcome = run_over_lanes(executor, [t for t in plan.tasks if t.name not in done], lanes, submit,
                                 lambda t: t.name, finished, progress)
    except BaseException:
        progress.close()
        tidy(run)
        raise
    progress.close()
    return outcome


def run_merge(options: MergeOptions, executor: Executor | None = None,
              progress: ProgressCallback | None = None) -> MergeSummary:
    """Check and plan, find what an interrupted run left (--resume), claim the output (the journal,
    before any task runs), merge the shards, publish. SIGTERM or Ctrl-C stops it cleanly:
    Interrupted, once the tasks are cancelled, the uploads aborted and the journal current.
    `executor`: where the tasks run (default: Ray, as options.ray_address says)."""
    run = Run(open_storage(options.output, options.storage))
    with stop_signals():
        try:
            return _merge(options, run, executor, progress)
        except KeyboardInterrupt:
            raise interrupted(run, options) from None


def _merge(options: MergeOptions, run: Run, executor: Executor | None,
           progress: ProgressCallback | None) -> MergeSummary:
    """The output held (jobs.lease) from its first write to the end, done or not."""
    output = run.output
    lease = Lease(output, options.lease_seconds, "unmerge" if options.unmerge else "merge")
    lease.refuse_live()  # another job writing here now: refused at once
    finished = check_output(output, options)
    if not finished:  # a finished model may be this very merge, whoever wrote it (already_complete)
        output.check_writable()
        lease.check(may_take_over=options.resume or options.overwrite)
    try:
        return _merge_held(options, run, executor, progress, finished, lease)
    finally:
        lease.release()


def _merge_held(options: MergeOptions, run: Run, executor: Executor | None, progress: ProgressCallback | None,
                finished: bool, lease: Lease) -> MergeSummary:
    started = time.perf_counter()
    output = run.output
    prepared, records = _check_and_plan(output, options)
    plan = prepared.plan
    run.key = fingerprint(plan, [_weights_sha256(r) for r in records],
                          {"allow_nonfinite": options.allow_nonfinite, "validate": options.validate})
    if finished and already_complete(output, options, run.key):
        return _done_before(output, options, prepared, started)
    run.total = len(plan.tasks)
    reused, clearing = resumable(output, options, plan, run.key)
    planned = time.perf_counter()

    executor = start_executor(executor, options.ray_address)
    nodes = executor.nodes()
    lanes = plan_lanes(nodes, options.device, options.task_cpus, len(plan.tasks) - len(reused))
    check_fits(nodes, max(plan.tasks, key=lambda t: t.memory_bytes))
    lease.take(may_take_over=options.resume or options.overwrite)  # the first write of this run
    claim(run, options, reused, clearing)
    original = _original(options, plan, prepared.base)
    job = MergeJob.of(plan, output.uri, storage=options.storage, device=options.device,
                      allow_nonfinite=options.allow_nonfinite, read_back=options.validate, original_uri=original)
    outcome = _run_shards(executor, plan, job, options, lanes, run, progress)
    merged = time.perf_counter()

    run.record()  # current before the final task, which publishes only what the journal vouches for
    results = run.done
    cluster = {"resources": executor.resources(), "nodes": len([n for n in executor.nodes() if n.get("Alive")]),
               "lanes": {lane.name: lane.slots for lane in lanes}, "executor": executor.name}
    publication = Publication(results=tuple(results), extra_files=prepared.base.extra_files,
                              index_metadata=prepared.base.index_metadata, adapter_records=tuple(records),
                              timings={"plan_seconds": planned - started, "merge_seconds": merged - planned},
                              cluster=cluster, retries=outcome.retries,
                              retry_reasons={k: tuple(v) for k, v in outcome.reasons.items()},
                              reused=tuple(r.name for r in reused), lineage=prepared.base.manifest,
                              original_uri=original, fingerprint=run.key)
    try:
        manifest = get_with_retries(executor, lambda reasons: executor.submit(
            finalize_work, (plan, job, dataclasses.replace(publication, final_retries=tuple(reasons))), {}),
            "the final task")
    except BaseException:
        tidy(run, record=False)  # the journal is current, and must not come back once the index is there
        raise
    if options.allow_pickle:
        _remove_staging(output, options.storage)
    return MergeSummary(output=output.uri, shards=len(plan.tasks), tensors=sum(r.tensors for r in results),
                        fused_tensors=plan.fused_tensor_count, bytes_read=plan.read_bytes,
                        bytes_written=sum(r.size for r in results), seconds=time.perf_counter() - started,
                        device=",".join(sorted({r.device for r in results})), retries=sum(outcome.retries.values()),
                        reused=len(reused), validated=options.validate, manifest=manifest,
                        # the nodes of this run: a reused shard was merged where the interrupted run ran
                        nodes=sorted({r.node for r in results if r.name not in {u.name for u in reused}}),
                        adapters=[{"uri": uri, "weight": w} for uri, w in zip(options.adapters, prepared.weights)])
