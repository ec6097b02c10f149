"""The Ray tasks: one per base shard (merge or verify), and the final one that publishes.

Each returns a small value; tensors never travel through Ray's object store, tasks read and
write storage themselves. max_retries=0: retries are the driver's (jobs/runner.py), which
tells transient failures from bad input. The tensor code (torch) is imported inside the tasks,
so that the driver, which imports this module to submit them, never loads it.
"""

from __future__ import annotations

import dataclasses

import ray

from merge_core.planning.plan import MergePlan, ShardTask
from merge_core.publish.publication import Publication
from merge_core.worker.shard_result import ShardResult
from merge_core.worker.spec import MergeSpec


@ray.remote(max_retries=0)
def merge_shard_task(task: ShardTask, spec: MergeSpec) -> ShardResult:
    from merge_core.numerics.workspace import resolve_device
    from merge_core.worker.shard_merge import merge_shard

    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
    result = merge_shard(task, spec, resolve_device(spec.device, bool(ray.get_gpu_ids())), threads=max(1, cpus))
    # The Ray node id, not the host name: simulated nodes share a host.
    return dataclasses.replace(result, node=ray.get_runtime_context().get_node_id())


@ray.remote(max_retries=0)
def verify_shard_task(task: ShardTask, spec: MergeSpec, expected_size: int | None, expected_sha256: str | None,
                      fused_ulps: int):
    from merge_core.publish.verify import verify_shard

    return verify_shard(task, spec, expected_size, expected_sha256, fused_ulps)


@ray.remote(max_retries=0)
def finalize_task(plan: MergePlan, spec: MergeSpec, publication: Publication) -> dict:
    from merge_core.publish.finalize import finalize_merge

    return finalize_merge(plan, spec, publication)
