"""A batch: several merged models from one read of the base (`lora-merge batch`).

Each output is what its own `lora-merge merge` would write, and is run as one: checked, claimed,
journaled and published on its own (jobs/output_run.py: its lease, its journal, its final task,
its manifest and report, its index last). What the outputs share is the shard tasks: one task per
base shard reads the shard once and writes it into every output that still needs it
(merge_core.worker.shard_merge.merge_shard_outputs).

One output's failure is that output's: refused at its checks (a bad adapter, another job's
claim), failed in a task (its fuse, its store), or failed at publication, it is reported and the
others go on. A task's failure that a retry may cure is retried for the outputs it failed, alone.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from jobs.batch_checks import check_batch
from jobs.claim import Run, tidy
from jobs.driver import executor_for, start_executor
from jobs.executor import Executor
from jobs.lease import Lease
from jobs.options import BatchOptions, outputs_of
from jobs.output_run import MergeSummary, OutputRun, hold_output, open_output, publish_output
from jobs.prepare import check_execution
from jobs.progress import Progress, plural, size_text
from jobs.runner import Interrupted, Outcome, stop_signals, stopped_by
from jobs.scheduling import check_fits, plan_lanes
from jobs.shared_shards import SharedShards
from merge_core.inputs.checkpoint import load_base
from merge_core.io.registry import open_storage

log = logging.getLogger("lora_merge")


@dataclass(kw_only=True)
class OutputOutcome:
    """How one output of a batch ended: its summary, or the error that stopped it."""
    output: str
    summary: MergeSummary | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(kw_only=True)
class BatchSummary:
    """What a batch did: each output's outcome, in the order given, and what the job read once."""
    base: str
    outputs: list[OutputOutcome]
    base_bytes: int  # the base's shards
    bytes_read: int  # fetched from the base by this job's tasks: each shard once, whatever the outputs
    bytes_written: int
    seconds: float
    tasks: int = 0

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    @property
    def failed(self) -> list[OutputOutcome]:
        return [o for o in self.outputs if not o.ok]

    def as_dict(self) -> dict:
        return {"base": self.base, "base_bytes": self.base_bytes, "bytes_read": self.bytes_read,
                "bytes_written": self.bytes_written, "seconds": self.seconds, "tasks": self.tasks,
                "outputs": [{"output": o.output, "ok": o.ok, "error": str(o.error) if o.error else None,
                             "summary": o.summary.as_dict() if o.summary else None} for o in self.outputs]}


class PartlyFailed(Exception):
    """A batch some of whose outputs failed (the others are published): the command prints what was
    done, one line per failed output, and exits with the worst failure's code."""

    def __init__(self, summary: BatchSummary, text: str, data: dict):
        super().__init__(f"{len(summary.failed)} of {len(summary.outputs)} outputs failed")
        self.summary, self.text, self.data = summary, text, data
        self.outcomes = summary.failed


@dataclass
class Member:
    """One output as the batch follows it: its run, and how it ends."""
    run: Run
    lease: Lease
    out: OutputRun | None = None
    failure: BaseException | None = None
    claimed: bool = False
    publishing: bool = False  # its final task ran: that tidies after itself
    outcome: Outcome = field(default_factory=Outcome)  # its retries, by shard

    @property
    def live(self) -> bool:
        return self.failure is None and self.out is not None and self.out.summary is None

    def fail(self, exc: BaseException) -> None:
        """This output is done for: nothing more lands in its journal. It stays claimed until the
        batch's tasks are over (one may still be writing its shard), then is tidied (let_go)."""
        if self.failure is None:
            self.failure = exc
            log.warning("output %s failed (the other outputs go on): %s", self.run.output.uri, exc)

    def let_go(self) -> None:
        """The batch is over: an unfinished output's journal current and no upload of it open, and
        its claim released."""
        if self.claimed and not self.publishing and (self.out is None or self.out.summary is None):
            tidy(self.run)
        self.lease.release()


def run_batch(batch: BatchOptions, executor: Executor | None = None,
              progress=None) -> BatchSummary:
    """Check the batch and read the base (bad input: InputError, nothing written), then each output
    as its own merge would, the shard tasks shared. SIGTERM or Ctrl-C: Interrupted, once the tasks
    are cancelled and every output's uploads aborted and journal current."""
    started = time.perf_counter()
    merges = outputs_of(batch)
    check_batch(batch, merges)
    check_execution(batch)
    executor = executor or executor_for(batch)
    base = load_base(open_storage(batch.checkpoint, batch.storage))
    members = [Member(run, Lease(run.output, m.lease_seconds, "batch"))
               for m in merges for run in [Run(open_storage(m.output, m.storage))]]
    with stop_signals():
        try:
            shards = _run(batch, merges, members, base, executor, progress)
        except KeyboardInterrupt:
            raise _interrupted(members) from None
        finally:
            for member in members:
                member.let_go()
    outcomes = [OutputOutcome(output=m.run.output.uri, summary=None if m.failure else m.out.summary,
                              error=m.failure) for m in members]
    written = sum(o.summary.bytes_written for o in outcomes if o.summary)
    return BatchSummary(base=base.uri, outputs=outcomes, base_bytes=sum(s.size for s in base.shards),
                        bytes_read=shards.bytes_read if shards else 0, bytes_written=written,
                        seconds=time.perf_counter() - started, tasks=shards.tasks_run if shards else 0)


def _run(batch: BatchOptions, merges, members: list[Member], base, executor: Executor,
         progress) -> SharedShards | None:
    for merge, member in zip(merges, members):
        try:
            member.out = open_output(merge, member.run, member.lease, base)
        except Exception as exc:  # this output's bad input (or store): the others go on
            member.fail(exc)
    live = [m for m in members if m.live]
    if not live:
        return None
    executor = start_executor(executor)
    for member in live:
        member.out.ready = time.perf_counter()
    shards = SharedShards(executor, live, batch, _progress(live, progress))
    nodes = executor.nodes()
    lanes = plan_lanes(nodes, batch.device, batch.task_cpus, len(shards.jobs))
    check_fits(nodes, shards.largest())
    for member in live:
        try:
            hold_output(member.out)
            member.claimed = True
        except Exception as exc:
            member.claimed = member.run.claimed
            member.fail(exc)
    shards.run(lanes)
    merged = time.perf_counter()
    for member in (m for m in live if m.live):
        member.publishing = True
        try:
            member.out.summary = publish_output(member.out, executor, lanes, member.outcome.retries,
                                                member.outcome.reasons, merged,
                                                f"the final task of {member.run.output.uri}")
        except Exception as exc:
            member.fail(exc)
    return shards


def _progress(live: list[Member], callback) -> Progress:
    total = sum(len(m.out.plan.tasks) for m in live)
    written = sum(m.out.plan.write_bytes for m in live)
    read = sum(t.shard.size for t in live[0].out.plan.tasks)
    log.info("merging %s of the base (%s, read once) into %s (%s to write)",
             plural(len(live[0].out.plan.tasks), "shard"), size_text(read), plural(len(live), "output"),
             size_text(written))
    return Progress(total, written, callback=callback)


def _interrupted(members: list[Member]) -> Interrupted:
    """What a stopped batch says: how far each output got, and how to finish."""
    name = stopped_by() or "SIGINT"
    held = [m for m in members if m.claimed and m.failure is None and not (m.out and m.out.summary)]
    if not held:
        return Interrupted(name, f"interrupted by {name} before any output was claimed; nothing was written")
    done = "; ".join(f"{m.run.output.uri}: {len(m.run.done)} of {m.run.total} shards done" for m in held)
    return Interrupted(name, f"interrupted by {name}: {done}; run the same command with --resume to finish")

