"""The merge driver: check every input up front, plan, run one Ray task per shard, then publish."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import ray

from jobs.options import MergeInputs, MergeOptions
from jobs.progress import Progress
from jobs.runner import get_with_retries, run_over_lanes
from jobs.scheduling import check_fits, plan_lanes
from jobs.tasks import finalize_task, merge_shard_task
from merge_core.errors import InputError, TransientStorageError
from merge_core.inputs.adapter import LoraAdapter, load_adapter
from merge_core.inputs.adapter_files import scan_adapter, stage_pickled_adapter
from merge_core.inputs.checkpoint import BaseCheckpoint, load_base
from merge_core.io.pipeline import sha256_of
from merge_core.io.registry import open_storage
from merge_core.io.storage import Storage, StorageOptions
from merge_core.names import ADAPTER_CONFIG_NAME, ADAPTER_PICKLE_NAME, ADAPTER_WEIGHTS_NAME, INDEX_NAME, STAGING_DIR
from merge_core.planning.plan import MergePlan
from merge_core.planning.planner import plan_merge
from merge_core.publish.journal import fingerprint, proven, read_journal, write_journal
from merge_core.publish.manifest import adapter_record
from merge_core.publish.publication import Publication
from merge_core.worker.shard_result import ShardResult
from merge_core.worker.spec import MergeSpec

log = logging.getLogger("lora_merge")
DEVICES = ("auto", "cpu", "cuda")
# The driver never puts tensors in Ray's object store, so a local cluster needs only a little.
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Prepared:
    base: BaseCheckpoint
    adapters: tuple[LoraAdapter, ...]
    weights: tuple[float, ...]
    plan: MergePlan


@dataclass
class MergeSummary:
    output: str
    shards: int
    tensors: int
    fused_tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    device: str
    retries: int = 0
    reused: int = 0
    validated: bool = True
    nodes: list[str] = field(default_factory=list)
    manifest: dict = field(default_factory=dict, repr=False)

    @property
    def gb_per_second(self) -> float:
        return self.bytes_written / self.seconds / 1e9 if self.seconds else 0.0


def prepare(inputs: MergeInputs, pickle_staging: str | None = None) -> Prepared:
    """Read and check every input, and plan: everything that can be refused is refused here.
    With pickle_staging (a URI), pickle-only adapters are converted there (--allow-pickle)."""
    if inputs.device not in DEVICES:
        raise InputError("--device", f"unknown device {inputs.device!r}", f"use one of {', '.join(DEVICES)}")
    if not inputs.adapters:
        raise InputError("--adapter", "no adapter given", "pass at least one --adapter")
    weights = tuple(inputs.weights) or (1.0,) * len(inputs.adapters)
    base = load_base(open_storage(inputs.base, inputs.storage))
    adapters = []
    for number, uri in enumerate(inputs.adapters):
        storage = open_storage(uri, inputs.storage)
        if pickle_staging and not storage.exists(ADAPTER_WEIGHTS_NAME) and storage.exists(ADAPTER_PICKLE_NAME):
            staged = open_storage(f"{pickle_staging}/adapter-{number}", inputs.storage)
            stage_pickled_adapter(storage, staged)
            storage = staged
        adapters.append(load_adapter(storage))
    plan = plan_merge(base, adapters, weights, inputs.sequential, inputs.combine_spec, inputs.allow_base_mismatch,
                      inputs.dequantize)
    return Prepared(base, tuple(adapters), weights, plan)


def _remove_staging(output: Storage, options: StorageOptions) -> None:
    open_storage(f"{output.uri}/{STAGING_DIR}", options).remove_tree()


def _check_output(output: Storage, options: MergeOptions) -> None:
    inputs = [open_storage(uri, options.storage).uri.rstrip("/") for uri in (options.base, *options.adapters)]
    if output.uri.rstrip("/") in inputs:
        raise InputError(output.uri, "the output is one of the inputs", "choose another --output")
    if options.overwrite and options.resume:
        raise InputError("--resume", "cannot be combined with --overwrite", "pass one of them")
    names = output.list_names()
    if INDEX_NAME in names and not options.overwrite:
        raise InputError(output.describe(INDEX_NAME), "the output already holds a model",
                         "pass --overwrite to replace it, or choose another --output")
    if names and not (options.overwrite or options.resume):
        raise InputError(output.uri, f"the output holds an unfinished merge ({len(names)} files)",
                         "pass --resume to finish it, --overwrite to start over, or choose an empty --output")


def _clear_output(output: Storage) -> None:
    """--overwrite replaces the old output whole: stale shards of another layout would otherwise
    sit beside the new ones, and a loader may pick a stale model.safetensors over the index.
    The index goes first, so the old output stops being a model before anything else changes."""
    output.delete(INDEX_NAME)
    for name in output.list_names():
        output.delete(name)
    output.discard_incomplete()


def connect(address: str | None) -> None:
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # "local": a new Ray for this job, never silently a cluster that `ray start` left on this machine.
        ray.init(address="local", include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 logging_level=logging.WARNING)


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


def _describe(result: ShardResult) -> str:
    return (f"{result.fused} tensors fused, {result.seconds:.2f} s on node {result.node[:8]} ({result.device}), "
            f"fuse {result.fuse_seconds:.2f} s, waiting on reads {result.read_wait_seconds:.2f} s")


def _check_and_plan(output: Storage, options: MergeOptions) -> tuple[Prepared, list[dict]]:
    """Every input read and checked, the plan made, the adapters hashed; nothing written but the
    staged copy of a pickle-only adapter (--allow-pickle), removed again on failure."""
    _check_output(output, options)
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
    except BaseException:
        if staging:
            _remove_staging(output, options.storage)
        raise
    return prepared, records


def _resume(output: Storage, options: MergeOptions, plan: MergePlan, journal_key: str) -> list[ShardResult]:
    """With --resume, the shards of the interrupted run that storage still proves complete."""
    if not options.resume:
        return []
    return proven(output, open_storage(options.base, options.storage), read_journal(output, journal_key), plan)


def _run_shards(plan: MergePlan, spec: MergeSpec, output: Storage, options: MergeOptions, lanes,
                reused: list[ShardResult], journal_key: str):
    """One task per shard not reused, over the lanes, the journal rewritten after each."""
    log.info("merging %d shards (%d tensors fused, %.2f GB) into %s", len(plan.tasks), plan.fused_tensor_count,
             plan.write_bytes / 1e9, output.uri)
    progress = Progress(len(plan.tasks), plan.write_bytes)
    for result in reused:
        progress.shard_done(result.name, result.size, "reused from the unfinished run", reused=True)
    memory = {t.name: t.memory_bytes for t in plan.tasks}
    done: list[ShardResult] = list(reused)

    def finished(task, result: ShardResult) -> None:
        done.append(result)
        progress.shard_done(result.name, result.size, _describe(result))
        try:
            write_journal(output, journal_key, done)
        except (TransientStorageError, OSError) as exc:  # the journal only helps a later --resume
            log.warning("could not update the resume journal: %s", exc)

    def submit(task, lane_options):
        return merge_shard_task.options(**lane_options, memory=memory[task.name],
                                        resources=dict(options.task_resources) or None).remote(task, spec)

    reused_names = {r.name for r in reused}
    try:
        outcome = run_over_lanes([t for t in plan.tasks if t.name not in reused_names], lanes, submit,
                                 lambda t: t.name, finished, progress)
    except BaseException:
        output.discard_incomplete()  # writers abort their own uploads; a worker that was killed could not
        raise
    finally:
        progress.close()
    return done, outcome


def run_merge(options: MergeOptions) -> MergeSummary:
    """Check and plan, find what an interrupted run left (--resume), merge the shards, publish."""
    started = time.perf_counter()
    output = open_storage(options.output, options.storage)
    prepared, records = _check_and_plan(output, options)
    plan = prepared.plan
    journal_key = fingerprint(plan, [_weights_sha256(r) for r in records],
                              {"allow_nonfinite": options.allow_nonfinite, "validate": options.validate})
    reused = _resume(output, options, plan, journal_key)
    planned = time.perf_counter()

    connect(options.ray_address)
    lanes = plan_lanes(ray.nodes(), options.device, options.task_cpus)
    check_fits(ray.nodes(), max(plan.tasks, key=lambda t: t.memory_bytes))
    if options.overwrite:
        _clear_output(output)
    elif options.resume:
        output.discard_incomplete()  # temp files and uploads of the interrupted run's unfinished shards
    spec = MergeSpec.of(plan, output.uri, storage=options.storage, device=options.device,
                        allow_nonfinite=options.allow_nonfinite, read_back=options.validate)
    results, outcome = _run_shards(plan, spec, output, options, lanes, reused, journal_key)
    merged = time.perf_counter()

    cluster = {"resources": ray.cluster_resources(), "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
               "lanes": {lane.name: lane.slots for lane in lanes}}
    publication = Publication(tuple(results), prepared.base.extra_files, prepared.base.index_metadata,
                              tuple(records), {"plan_seconds": planned - started, "merge_seconds": merged - planned},
                              cluster, outcome.retries, tuple(r.name for r in reused))
    manifest = get_with_retries(lambda: finalize_task.remote(plan, spec, publication), "the final task")
    if options.allow_pickle:
        _remove_staging(output, options.storage)
    return MergeSummary(output.uri, len(plan.tasks), sum(r.tensors for r in results), plan.fused_tensor_count,
                        plan.read_bytes, sum(r.size for r in results), time.perf_counter() - started,
                        ",".join(sorted({r.device for r in results})), sum(outcome.retries.values()),
                        len(reused), options.validate, sorted({r.node for r in results}), manifest)
