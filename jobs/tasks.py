"""The work of each task: one per base shard (merge or verify), and the final one that publishes.

Plain functions, free of Ray: an executor (jobs/executor.py) runs them, on a Ray cluster or in
this process, and tells each where it runs (its node, CPUs and whether it has a GPU). Each returns
a small value; tensors never travel between processes, tasks read and write storage themselves.
The tensor code (torch) is imported inside them, so that a driver that only submits them never
loads it.
"""

from __future__ import annotations

import dataclasses
import pickle
import threading
from dataclasses import dataclass
from typing import Sequence

from merge_core.planning.plan import MergePlan, ShardTask
from merge_core.publish.publication import Publication
from merge_core.worker.job import MergeJob
from merge_core.worker.shard_result import ShardResult


@dataclass(frozen=True)
class Placement:
    """Where a task runs, as its executor assigned it."""
    node: str  # the Ray node id (simulated nodes share a host, so not the host name)
    cpus: int = 1
    gpu: bool = False
    # Set when the job is stopped, for a task that shares the driver's process (a Ray task is
    # killed instead): it ends at its next tensor.
    stop: threading.Event | None = None


def merge_shard_work(task: ShardTask, job: MergeJob, where: Placement) -> ShardResult:
    from merge_core.numerics.workspace import resolve_device
    from merge_core.worker.shard_merge import merge_shard

    result = merge_shard(task, job, resolve_device(job.device, where.gpu), threads=max(1, where.cpus),
                          stop=where.stop)
    return dataclasses.replace(result, node=where.node)


def merge_outputs_work(tasks: Sequence[ShardTask], jobs: Sequence[MergeJob],
                       where: Placement) -> list[ShardResult | BaseException]:
    """One base shard, read once, merged into several outputs: each output's result, or what made
    that output fail (in a form that travels back to the driver)."""
    from merge_core.numerics.workspace import resolve_device
    from merge_core.worker.shard_merge import merge_shard_outputs

    results = merge_shard_outputs(tasks, jobs, resolve_device(jobs[0].device, where.gpu),
                                   threads=max(1, where.cpus), stop=where.stop)
    return [_portable(r) if isinstance(r, BaseException) else dataclasses.replace(r, node=where.node)
            for r in results]


def _portable(exc: BaseException) -> BaseException:
    """The failure as the driver can receive it: itself when it pickles (the project's errors do),
    else a RuntimeError with its type and message (a client library's error may not)."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def verify_shard_work(task: ShardTask, job: MergeJob, expected_size: int | None, expected_digest: str | None,
                      fused_ulps: int, where: Placement):
    from merge_core.publish.verify import verify_shard

    return verify_shard(task, job, expected_size, expected_digest, fused_ulps, where.stop)


def finalize_work(plan: MergePlan, job: MergeJob, publication: Publication, where: Placement) -> dict:
    from merge_core.publish.finalize import finalize_merge

    return finalize_merge(plan, job, publication, where.stop)
