"""The merge driver: check every input up front, plan, run one task per shard (on Ray, through
the executor), then publish. One output (jobs/output_run.py); a batch of outputs from one read of
the base is jobs/batch.py."""

from __future__ import annotations

import logging
import time
from typing import Callable

from jobs.claim import Run, interrupted, tidy
from jobs.executor import Executor, LocalExecutor
from jobs.lease import Lease
from jobs.options import MergeOptions, RayOptions
from jobs.output_run import MergeSummary, OutputRun, hold_output, open_output, publish_output
from jobs.prepare import DEVICES, Prepared, prepare
from jobs.progress import Progress, ProgressEvent, plural, size_text
from jobs.runner import reclaim_signals, run_over_lanes, stop_signals
from jobs.scheduling import check_fits, plan_lanes
from jobs.tasks import merge_shard_work
from merge_core.io.registry import open_storage
from merge_core.planning.plan import MergePlan
from merge_core.worker.job import MergeJob
from merge_core.worker.shard_result import ShardResult

log = logging.getLogger("lora_merge")
ProgressCallback = Callable[[ProgressEvent], None]
__all__ = ["DEVICES", "MergeSummary", "Prepared", "ProgressCallback", "prepare", "run_merge", "start_executor"]


def executor_for(options: RayOptions) -> Executor:
    """The executor options.executor names, not started yet: threads of this process (local; they
    import torch while the driver plans), or Ray (the cluster at options.ray_address, or a local one)."""
    if options.executor == "local":
        return LocalExecutor()
    from jobs.ray_executor import RayExecutor  # here: `plan` and in-process runs never load Ray

    return RayExecutor(options.ray_address)


def start_executor(executor: Executor) -> Executor:
    """The executor a job runs on (executor_for, or the caller's own), started."""
    executor.start()
    reclaim_signals()
    return executor


def _describe(result: ShardResult) -> str:
    return (f"{plural(result.fused, 'tensor')} fused, {result.seconds:.2f} s on node {result.node[:8]} "
            f"({result.device}), "
            f"fuse {result.fuse_seconds:.2f} s, waiting on reads {result.read_wait_seconds:.2f} s")


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
        run.land(result)
        progress.shard_done(result.name, result.size, _describe(result))

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
    executor = executor or executor_for(options)
    with stop_signals():
        try:
            return _merge(options, run, executor, progress)
        except KeyboardInterrupt:
            raise interrupted(run, options) from None


def _merge(options: MergeOptions, run: Run, executor: Executor,
           progress: ProgressCallback | None) -> MergeSummary:
    """The output held (jobs.lease) from its first write to the end, done or not."""
    lease = Lease(run.output, options.lease_seconds, "unmerge" if options.unmerge else "merge")
    try:
        out = open_output(options, run, lease)
        return out.summary or _merge_held(out, executor, progress)
    finally:
        lease.release()


def _merge_held(out: OutputRun, executor: Executor, progress: ProgressCallback | None) -> MergeSummary:
    options, plan = out.options, out.plan
    executor = start_executor(executor)
    out.ready = time.perf_counter()
    nodes = executor.nodes()
    lanes = plan_lanes(nodes, options.device, options.task_cpus, len(plan.tasks) - len(out.reused))
    check_fits(nodes, max(plan.tasks, key=lambda t: t.memory_bytes))
    hold_output(out)
    outcome = _run_shards(executor, plan, out.job, options, lanes, out.run, progress)
    return publish_output(out, executor, lanes, outcome.retries, outcome.reasons, time.perf_counter())
