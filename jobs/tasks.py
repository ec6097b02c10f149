"""The Ray tasks: one per base shard (merge or verify), and the final one that publishes.

Each returns a small value; tensors never travel through Ray's object store, tasks read and
write storage themselves. max_retries=0: retries are the driver's (jobs/runner.py), which
tells transient failures from bad input. The tensor code (torch) is imported inside the tasks,
so that the driver, which imports this module to submit them, never loads it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Mapping, Sequence

import ray

from merge_core.io.registry import open_storage
from merge_core.io.storage import StorageOptions
from merge_core.numerics.combine import CombineSpec
from merge_core.planning.plan import MergePlan, ShardTask
from merge_core.worker.shard_result import ShardResult


@ray.remote(max_retries=0)
def merge_shard_task(task: ShardTask, base_uri: str, adapter_uris: Sequence[str], output_uri: str,
                     device: str, options: StorageOptions, allow_nonfinite: bool, validate: bool,
                     sequential: bool = False, combine: CombineSpec | None = None) -> ShardResult:
    from merge_core.numerics.workspace import resolve_device
    from merge_core.worker.shard_merge import merge_shard

    gpu_assigned = bool(ray.get_gpu_ids())
    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
    result = merge_shard(task, base_uri, adapter_uris, output_uri, resolve_device(device, gpu_assigned), options,
                         allow_nonfinite=allow_nonfinite, read_back=validate, threads=max(1, cpus),
                         sequential=sequential, combine=combine)
    # The Ray node id, not the host name: simulated nodes share a host.
    return dataclasses.replace(result, node=ray.get_runtime_context().get_node_id())


@ray.remote(max_retries=0)
def verify_shard_task(task: ShardTask, base_uri: str, adapter_uris: Sequence[str], merged_uri: str,
                      options: StorageOptions, expected_size: int | None, expected_sha256: str | None,
                      fused_ulps: int, sequential: bool = False, combine: CombineSpec | None = None):
    from merge_core.publish.validate import verify_shard

    return verify_shard(task, open_storage(base_uri, options), [open_storage(u, options) for u in adapter_uris],
                        open_storage(merged_uri, options), expected_size, expected_sha256, fused_ulps, sequential,
                        combine)


@ray.remote(max_retries=0)
def finalize_task(plan: MergePlan, output_uri: str, options: StorageOptions, extra_files: Sequence[str],
                  base_index_metadata: Mapping[str, object], adapter_records: Sequence[Mapping[str, object]],
                  results: Sequence[ShardResult], timings: Mapping[str, float],
                  cluster: Mapping[str, object], retries: Mapping[str, int], reused: Sequence[str],
                  validate: bool) -> dict:
    from merge_core.publish.finalize import build_index, copy_extra_files, publish, validate_merge
    from merge_core.publish.manifest import build_manifest
    from merge_core.publish.report import build_report

    started = time.perf_counter()
    output, base = open_storage(output_uri, options), open_storage(plan.base_uri, options)
    index, total_size = build_index(plan, base_index_metadata)
    if validate:
        validate_merge(plan, results, index, base, [open_storage(u, options) for u in plan.adapter_uris], output)
    copied = copy_extra_files(plan, base, output, extra_files, options)
    timings = dict(timings) | {"finalize_seconds": time.perf_counter() - started}
    manifest = build_manifest(plan, adapter_records, results, copied, total_size, timings, cluster, retries, reused)
    publish(output, plan, index, manifest, build_report(plan, results))
    return manifest
