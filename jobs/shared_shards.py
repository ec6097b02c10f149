"""A batch's shard tasks: one per base shard, writing it into every output that still needs it,
over the executor's lanes (jobs/runner.py).

Each output keeps its own record: a shard lands in its journal as soon as the task returns it,
and its retries are counted against it. A task returns, per output, its result or its failure;
a failure a retry may cure comes back as a task of its own for that output alone (reading the
shard again, for it only), after a backoff; any other failure ends that output. A task that fails
as a whole (the base unreadable, the worker lost) is retried for all of its outputs, and if it
cannot be, fails them all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from jobs.executor import Executor
from jobs.progress import Progress, plural
from jobs.runner import MAX_ATTEMPTS, SHARD_BACKOFF_SECONDS, backoff, is_transient, one_line, run_over_lanes
from jobs.tasks import merge_outputs_work
from merge_core.planning.plan import shared_memory_bytes
from merge_core.worker.shard_result import ShardResult

log = logging.getLogger("lora_merge")


@dataclass(frozen=True)
class SharedShard:
    """One base shard and the outputs (members' positions) a task writes it into."""
    name: str
    outputs: tuple[int, ...]
    again_for: str = ""  # a retry for one output alone: that output

    @property
    def key(self) -> str:
        return f"{self.name} for {self.again_for}" if self.again_for else self.name


@dataclass(frozen=True)
class Need:
    """What a task asks of a node (for jobs.scheduling.check_fits)."""
    name: str
    memory_bytes: int


class SharedShards:
    def __init__(self, executor: Executor, members: Sequence, options, progress: Progress):
        self.executor, self.members, self.options, self.progress = executor, members, options, progress
        names = [t.name for t in members[0].out.plan.tasks]
        self.tasks = {i: {t.name: t for t in m.out.plan.tasks} for i, m in enumerate(members)}
        reused = [{r.name for r in m.out.reused} for m in members]
        self.jobs = []
        for name in names:
            wanting = tuple(i for i in range(len(members)) if name not in reused[i])
            if wanting:
                self.jobs.append(SharedShard(name, wanting))
        for m in members:
            for result in m.out.reused:
                progress.shard_done(f"{result.name} of {m.run.output.uri}", result.size,
                                    "reused from the unfinished run", reused=True)
        self.sent: dict[SharedShard, tuple[int, ...]] = {}
        self.attempts: dict[tuple[str, int], int] = {}
        self.bytes_read = 0
        self.tasks_run = 0

    def memory(self, name: str, outputs: Sequence[int]) -> int:
        """The task's peak, and each output's upload buffers (parts of an object store's upload)."""
        shard_tasks = [self.tasks[i][name] for i in outputs]
        return shared_memory_bytes(shard_tasks) + sum(self.members[i].run.output.upload_buffer_bytes for i in outputs)

    def largest(self) -> Need:
        name = max((job.name for job in self.jobs), key=lambda n: self.memory(n, range(len(self.members))),
                   default=None)
        return Need(name or "-", self.memory(name, range(len(self.members))) if name else 0)

    def submit(self, job: SharedShard, lane_options: dict):
        outputs = tuple(i for i in job.outputs if self.members[i].live)
        if not outputs:
            return None  # every output it was for has failed since
        self.sent[job] = outputs
        for i in outputs:
            self.attempts[(job.name, i)] = self.attempts.get((job.name, i), 0) + 1
        tasks = [self.tasks[i][job.name] for i in outputs]
        jobs = [self.members[i].out.job for i in outputs]
        return self.executor.submit(merge_outputs_work, (tasks, jobs), dict(
            lane_options, memory=self.memory(job.name, outputs),
            resources=dict(self.options.task_resources) or None))

    def finished(self, job: SharedShard, results: list) -> list[tuple[float, SharedShard]]:
        """Each output's shard into its journal; a failure retried for its output alone, or its end."""
        again = []
        self.tasks_run += 1
        self.bytes_read += next((r.base_bytes_read for r in results if isinstance(r, ShardResult)), 0)
        for i, result in zip(self.sent[job], results):
            member = self.members[i]
            if member.failure is not None:  # failed meanwhile: its journal takes nothing more
                continue
            if isinstance(result, ShardResult):
                self._landed(member, result)
                continue
            attempts = self.attempts[(job.name, i)]
            if not is_transient(result, self.executor.transient) or attempts >= MAX_ATTEMPTS:
                member.fail(result)
                continue
            wait = backoff(attempts, SHARD_BACKOFF_SECONDS)
            member.outcome.retried(job.name, one_line(result))
            self.progress.retry(f"{job.name} of {member.run.output.uri}", f"{one_line(result)}; again in {wait:.1f} s",
                                attempts + 1)
            again.append((wait, SharedShard(job.name, (i,), member.run.output.uri)))
        return again

    def _landed(self, member, result: ShardResult) -> None:
        member.run.land(result)
        self.progress.shard_done(f"{result.name} of {member.run.output.uri}", result.size,
                                 f"{plural(result.fused, 'tensor')} fused, {result.seconds:.2f} s "
                                 f"({result.outputs} from one read)")

    def failed(self, job: SharedShard, exc: BaseException) -> None:
        for i in self.sent.get(job, job.outputs):
            self.members[i].fail(exc)

    def run(self, lanes) -> None:
        try:
            outcome = run_over_lanes(self.executor, self.jobs, lanes, self.submit, lambda j: j.key, self.finished,
                                     self.progress, on_failure=self.failed)
        finally:
            self.progress.close()
        for key, reasons in outcome.reasons.items():  # a whole task retried: each of its outputs was
            job = next(j for j in self.sent if j.key == key)
            for i in self.sent[job]:
                for reason in reasons:
                    self.members[i].outcome.retried(job.name, reason)
