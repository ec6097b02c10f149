"""The driver: check every input up front, plan, run one Ray task per shard, then publish."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import ray

from jobs.scheduling import Lane, free_lane, plan_lanes
from jobs.tasks import finalize_task, merge_shard_task
from merge_core.adapter import CONFIG_NAME, WEIGHTS_NAME, LoraAdapter, load_adapter
from merge_core.checkpoint import INDEX_NAME, load_base
from merge_core.errors import InputError
from merge_core.manifest import adapter_record
from merge_core.plan import MergePlan, plan_merge
from merge_core.shard_merge import ShardResult
from merge_core.s3_storage import MAX_PARTS, MIN_PART_BYTES
from merge_core.storage import Storage, StorageOptions, open_storage, sha256_of

log = logging.getLogger("lora_merge")
DEVICES = ("auto", "cpu", "cuda")
# The driver never puts tensors in Ray's object store, so a local cluster needs only a little.
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class MergeOptions:
    base: str
    adapters: Sequence[str]
    output: str
    weights: Sequence[float] = ()
    overwrite: bool = False
    device: str = "auto"
    ray_address: str | None = None
    storage: StorageOptions = StorageOptions()


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
    nodes: list[str] = field(default_factory=list)
    manifest: dict = field(default_factory=dict, repr=False)

    @property
    def gb_per_second(self) -> float:
        return self.bytes_written / self.seconds / 1e9 if self.seconds else 0.0


def _check_output(base: Storage, output: Storage, plan: MergePlan, options: MergeOptions) -> None:
    if output.uri.rstrip("/") == base.uri.rstrip("/"):
        raise InputError(output.uri, "the output is the base checkpoint itself", "choose another --output")
    part_size = options.storage.part_size
    if part_size < MIN_PART_BYTES:
        raise InputError("--part-size-mb", f"{part_size // 2**20} MiB is below S3's 5 MiB minimum part size",
                         "use --part-size-mb 5 or more")
    largest = max(t.shard.size for t in plan.tasks)
    if largest > part_size * MAX_PARTS:
        raise InputError("--part-size-mb", f"a {largest}-byte shard needs more than {MAX_PARTS} parts",
                         f"use --part-size-mb {-(-largest // MAX_PARTS // 2**20)} or more")
    overwrite = options.overwrite
    names = output.list_names()
    if INDEX_NAME in names and not overwrite:
        raise InputError(output.describe(INDEX_NAME), "the output already holds a model",
                         "pass --overwrite to replace it, or choose another --output")
    if names and not overwrite:
        raise InputError(output.uri, f"the output is not empty ({len(names)} files) and holds no complete model",
                         "pass --overwrite to replace what is there, or choose an empty --output")


def _clear_output(output: Storage) -> None:
    """--overwrite replaces the old output whole: stale shards of another layout would otherwise
    sit beside the new ones, and a loader may pick a stale model.safetensors over the index.
    The index goes first, so the old output stops being a model before anything else changes."""
    output.delete(INDEX_NAME)
    for name in output.list_names():
        output.delete(name)
    output.discard_incomplete()


def _connect(address: str | None) -> None:
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 logging_level=logging.WARNING)


def _adapter_files(adapter: LoraAdapter, options: StorageOptions) -> list[dict]:
    storage = open_storage(adapter.uri, options)
    return [{"name": n, "size": storage.size(n), "sha256": sha256_of(storage, n)} for n in (CONFIG_NAME, WEIGHTS_NAME)]


def _run_tasks(plan: MergePlan, options: MergeOptions, lanes: list[Lane]) -> list[ShardResult]:
    queue = list(plan.tasks)
    pending: dict[ray.ObjectRef, Lane] = {}
    results: list[ShardResult] = []
    try:
        while queue or pending:
            lane = free_lane(lanes)
            if queue and lane:
                ref = merge_shard_task.options(**lane.options).remote(
                    queue.pop(0), plan.base_uri, plan.adapter_uris, options.output, options.device, options.storage)
                pending[ref] = lane
                lane.running += 1
                continue
            done, _ = ray.wait(list(pending), num_returns=1)
            pending.pop(done[0]).running -= 1
            result = ray.get(done[0])
            results.append(result)
            log.info("[%d/%d] %s: %.1f MB, %d tensors fused, %.2f s on node %s (%s)", len(results), len(plan.tasks),
                     result.name, result.size / 1e6, result.fused, result.seconds, result.node[:8], result.device)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return results


def run_merge(options: MergeOptions) -> MergeSummary:
    started = time.perf_counter()
    if options.device not in DEVICES:
        raise InputError("--device", f"unknown device {options.device!r}", f"use one of {', '.join(DEVICES)}")
    if not options.adapters:
        raise InputError("--adapter", "no adapter given", "pass at least one --adapter")
    weights = list(options.weights) or [1.0] * len(options.adapters)
    base_storage, output = open_storage(options.base, options.storage), open_storage(options.output, options.storage)
    base = load_base(base_storage)
    adapters = [load_adapter(open_storage(uri, options.storage)) for uri in options.adapters]
    plan = plan_merge(base, adapters, weights)
    _check_output(base_storage, output, plan, options)
    records = [adapter_record(a, w, _adapter_files(a, options.storage)) for a, w in zip(adapters, weights)]
    planned = time.perf_counter()

    _connect(options.ray_address)
    lanes = plan_lanes(ray.nodes(), options.device)
    if options.overwrite:
        _clear_output(output)
    log.info("merging %d shards (%d tensors fused, %.2f GB) into %s", len(plan.tasks), plan.fused_tensor_count,
             plan.write_bytes / 1e9, output.uri)
    try:
        results = _run_tasks(plan, options, lanes)
    except BaseException:
        # Writers abort their own uploads; a worker that was killed could not.
        output.discard_incomplete()
        raise
    merged = time.perf_counter()

    timings = {"plan_seconds": planned - started, "merge_seconds": merged - planned}
    cluster = {"resources": ray.cluster_resources(), "nodes": len(ray.nodes()), "lanes": {lane.name: lane.slots for lane in lanes}}
    manifest = ray.get(finalize_task.remote(plan, output.uri, options.storage, base.extra_files, base.index_metadata, records,
                                            results, timings, cluster))
    seconds = time.perf_counter() - started
    return MergeSummary(output.uri, len(plan.tasks), sum(r.tensors for r in results), plan.fused_tensor_count,
                        plan.read_bytes, sum(r.size for r in results), seconds,
                        ",".join(sorted({r.device for r in results})), sorted({r.node for r in results}), manifest)
