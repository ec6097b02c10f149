"""The Ray tasks: one per base shard, and the final one that publishes. Each returns a small value.

Tensors never travel through Ray's object store: tasks read and write storage themselves.
Only transient failures are retried (storage, network, a dead worker); an InputError is
raised straight back to the driver.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Mapping, Sequence

import ray

from merge_core.errors import TransientStorageError
from merge_core.finalize import build_index, check_shards, copy_extra_files, publish
from merge_core.fuse import resolve_device
from merge_core.manifest import build_manifest
from merge_core.plan import MergePlan, ShardTask
from merge_core.shard_merge import ShardResult, merge_shard
from merge_core.storage import StorageOptions, open_storage

TASK_RETRIES = 3
RETRYABLE = [TransientStorageError, ConnectionError, TimeoutError]


@ray.remote(max_retries=TASK_RETRIES, retry_exceptions=RETRYABLE)
def merge_shard_task(task: ShardTask, base_uri: str, adapter_uris: Sequence[str], output_uri: str,
                     device: str, options: StorageOptions) -> ShardResult:
    gpu_assigned = bool(ray.get_gpu_ids())
    result = merge_shard(task, base_uri, adapter_uris, output_uri, resolve_device(device, gpu_assigned), options)
    # The Ray node id, not the host name: simulated nodes share a host.
    return dataclasses.replace(result, node=ray.get_runtime_context().get_node_id())


@ray.remote(max_retries=TASK_RETRIES, retry_exceptions=RETRYABLE)
def finalize_task(plan: MergePlan, output_uri: str, options: StorageOptions, extra_files: Sequence[str],
                  base_index_metadata: Mapping[str, object], adapter_records: Sequence[Mapping[str, object]],
                  results: Sequence[ShardResult], timings: Mapping[str, float],
                  cluster: Mapping[str, object]) -> dict:
    started = time.perf_counter()
    output = open_storage(output_uri, options)
    check_shards(plan, results, output)
    copied = copy_extra_files(open_storage(plan.base_uri, options), output, extra_files)
    index, total_size = build_index(plan, base_index_metadata)
    timings = dict(timings) | {"finalize_seconds": time.perf_counter() - started}
    manifest = build_manifest(plan, adapter_records, results, copied, total_size, timings, cluster)
    publish(output, index, manifest)
    return manifest
