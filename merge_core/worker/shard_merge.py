"""Merge one base shard: stream it from storage once, fuse the planned tensors, stream the result
out; into one output, or into several (a batch: each output with its own adapters and settings,
each written exactly as its own merge would write it).

This is the whole of a worker's job, with no scheduler in sight: the Ray task in jobs/ only
calls merge_shard() or merge_shard_outputs(). Reads run ahead on a thread pool (prefetch),
uploads run behind on the writers', and this thread fuses and hashes in between. The worker
holds a bounded window of read-ahead bytes, one base tensor and one output's fused copy of it,
and a bounded window of bytes being written (shared by the outputs), never a whole shard and
never one copy per output; untouched tensors are copied byte for byte.

One output failing (its fuse, its writes, its read-back) is that output's failure: its upload
is aborted, the others go on, and it is returned in place of that output's result. A failure to
read the base or the adapters is the whole task's.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Sequence

import numpy
import torch

from merge_core.errors import ValidationError, raise_if_stopped
from merge_core.format.shard_writer import ShardStreamWriter
from merge_core.io.hashing import TimedDigest
from merge_core.io.pipeline import DEFAULT_AHEAD_BYTES, Behind, Window, read_ahead
from merge_core.io.registry import open_storage
from merge_core.io.storage import CountedReads
from merge_core.numerics.workspace import Workspace, workspace_for
from merge_core.planning.plan import ShardTask
from merge_core.worker.job import MergeJob
from merge_core.worker.merged_tensor import merged_tensor
from merge_core.worker.original import OriginalShard
from merge_core.worker.shard_items import HEADER, BaseTensor, Copy, Fuse, Roles, shard_items
from merge_core.worker.shard_result import ShardResult, check_stored


class _Laps:
    """Wall time split into buckets: each lap() charges the time since the previous one."""

    def __init__(self) -> None:
        self.seconds = {"wait": 0.0, "fuse": 0.0, "write": 0.0}
        self._mark = time.perf_counter()

    def lap(self, bucket: str) -> float:
        now = time.perf_counter()
        spent = now - self._mark
        self.seconds[bucket] += spent
        self._mark = now
        return spent


class _Output:
    """One output of the shard on its way out: its plan, its stream, what it fused, or its failure."""

    def __init__(self, task: ShardTask, job: MergeJob, window: Window | None):
        self.task, self.job = task, job
        self.roles = Roles.of(task)
        self.fused: list = []
        self.fuse_seconds = 0.0
        self.failure: BaseException | None = None
        self.stored: tuple[int, str] | None = None
        self.stream: ShardStreamWriter | None = None
        self.adapters, self.layout, self.original = [], {}, None
        try:
            self.storage = open_storage(job.output_uri, job.storage)
            self.adapters = [open_storage(u, job.storage) for u in job.adapter_uris]
            self.stream = ShardStreamWriter(self.storage.open_writer(task.output_name), task.output_tensors,
                                            task.shard.header.metadata, window, job.digest)
            self.layout = {i.name: i for i in self.stream.layout}
            self.original = OriginalShard(job, task.name) if job.original_uri else None
        except Exception as exc:  # this output's storage, not the task's
            self.fail(exc)

    def fail(self, exc: BaseException) -> None:
        self.failure = exc
        try:
            if self.stream is not None:
                self.stream.abort()
        except Exception:  # the failure that brought us here is the one to report
            pass


class _SharedShard:
    """One base shard read once: base bytes hashed behind, each output's tensors fused here in
    turn, each output written behind."""

    def __init__(self, tasks: Sequence[ShardTask], jobs: Sequence[MergeJob], workspace: Workspace,
                 stop: threading.Event | None = None):
        self.stop = stop
        self.base = CountedReads(open_storage(jobs[0].base_uri, jobs[0].storage))
        self.workspace = workspace
        # Several outputs share one write window (twice one writer's: the hash and the write of each
        # hold the same bytes), so that what waits to be written is bounded however many there are.
        window = Window(2 * DEFAULT_AHEAD_BYTES) if len(tasks) > 1 else None
        self.outputs = [_Output(task, job, window) for task, job in zip(tasks, jobs)]
        self.base_digest = TimedDigest(jobs[0].digest)
        self.hasher = Behind("hash-base")
        self.laps = _Laps()

    @property
    def live(self) -> list[_Output]:
        return [o for o in self.outputs if o.failure is None]

    def run(self) -> None:
        items = list(shard_items([o.task for o in self.outputs], self.base, [o.adapters for o in self.outputs]))
        current, hashed = None, None  # the base tensor the fuses after it start from
        shard = self.outputs[0].task.shard
        name, data_start = shard.name, shard.header.data_start
        for tag, data in read_ahead(items):
            self.laps.lap("wait")
            raise_if_stopped(self.stop, self.base.describe(name))
            if isinstance(tag, Fuse):
                self.fuse(self.outputs[tag.output], tag, data, current, hashed)
                continue
            hashed = self.hasher.submit(self.base_digest.update, data[0]).result
            if isinstance(tag, BaseTensor):
                current = data[0]
                self.copy([o for o in self.live if o.roles.copies(tag.info.name)], current,
                          (self.base, name, data_start + tag.info.start))
            elif isinstance(tag, Copy):
                self.copy(self.live, data[0], (self.base, name, tag.offset))
            elif tag == HEADER:  # each output has its own header, which may be the base's byte for byte
                for output in self.live:
                    output.stream.offer_header(data[0], self.base, name)
            self.laps.lap("write")
            if not self.live:
                return

    def copy(self, outputs: Sequence[_Output], data, source: tuple) -> None:
        """Bytes of the base the outputs take as they are, from `source` (storage, name, offset): an
        output stored where the base is may have its store copy them rather than receive them."""
        for output in outputs:
            try:
                output.stream.write_data(data, source)
            except Exception as exc:
                output.fail(exc)

    def fuse(self, output: _Output, tag: Fuse, extras: list, current, hashed) -> None:
        if output.failure is not None:
            return
        try:
            if tag.new:
                data, before_writing = extras, None
            elif tag.in_place:  # the base's digest must have its bytes before the fuse changes them
                data, before_writing = [current, *extras], hashed
            else:
                data, before_writing = [memoryview(numpy.frombuffer(current, numpy.uint8).copy()), *extras], None
            self._fuse_into(output, tag, data, before_writing)
        except Exception as exc:
            output.fail(exc)

    def _fuse_into(self, output: _Output, tag: Fuse, data: list, before_writing) -> None:
        task, job, target = output.task, output.job, tag.target
        outputs, fused = merged_tensor(task, target, data, job, self.workspace, before_writing)
        for name, stats in fused:
            if stats.nonfinite_introduced and not job.allow_nonfinite:
                raise ValidationError([f"{self.base.describe(task.name)}: tensor {name}: fusing produced "
                                       f"{stats.nonfinite_introduced} NaN/Inf values the base did not have "
                                       "(check the adapter, or pass --allow-nonfinite)"])
        if output.original is not None and target.quantized is None and not target.restore:
            fused = [(target.tensor, output.original.compare(target.tensor, outputs[0][1], fused[0][1]))]
        output.fused += fused
        output.fuse_seconds += self.laps.lap("fuse")
        for name, tensor in outputs:
            output.stream.write_tensor(output.layout[name], tensor)
        self.laps.lap("write")

    def commit(self) -> None:
        """Publish each output's shard, then read it back (job.read_back)."""
        for output in self.live:
            try:
                output.stored = output.stream.commit()
            except Exception as exc:
                output.fail(exc)
        self.hasher.drain()
        self.laps.lap("write")
        for output in self.live:
            if output.job.read_back:  # the size always; the bytes again where re-reading them proves something
                try:
                    check_stored(output.storage, output.task.output_name, *output.stored,
                                 rehash=output.storage.read_back_proves and not output.stream.store_checked)
                except Exception as exc:
                    output.failure = exc  # published, but not what was written: the journal never records it
        self.laps.lap("wait")

    def abort(self) -> None:
        for output in self.outputs:
            if output.failure is None and output.stored is None:
                output.fail(RuntimeError("the shard task failed"))

    def result(self, output: _Output, device: str, seconds: float) -> ShardResult | BaseException:
        if output.failure is not None:
            return output.failure
        size, digest = output.stored
        laps = self.laps.seconds
        return ShardResult(name=output.task.name, size=size, digest=digest, base_digest=self.base_digest.value(),
                           tensors=len(output.stream.layout), fused=len(output.task.targets),
                           read_wait_seconds=laps["wait"], fuse_seconds=output.fuse_seconds,
                           write_seconds=laps["write"], seconds=seconds, device=str(torch.device(device)),
                           node=socket.gethostname(), fused_stats=tuple(output.fused),
                           hash_seconds=self.base_digest.seconds + output.stream.hash_seconds,
                           base_bytes_read=self.base.bytes_read, outputs=len(self.outputs),
                           bytes_copied=output.stream.bytes_copied)


def merge_shard_outputs(tasks: Sequence[ShardTask], jobs: Sequence[MergeJob], device: str = "cpu",
                        threads: int | None = None,
                        stop: threading.Event | None = None) -> list[ShardResult | BaseException]:
    """Write one base shard merged into each output (`tasks[i]` of `jobs[i]`'s plan, all of the same
    base shard), reading the shard once. Returns, per output, its ShardResult or what made it fail.
    With job.read_back, the published bytes are read again and hashed. A fused tensor that gains
    NaN/Inf fails its output (ValidationError) unless job.allow_nonfinite. `device`: the torch
    device to fuse on; `threads`: the CPU cores the float32 math may use (the task's share); `stop`:
    when set, the task ends at its next tensor (Stopped), its uploads aborted."""
    started = time.perf_counter()
    threads_before = torch.get_num_threads()
    if threads:  # this thread's share (a new thread starts from the last value set, so it is put back)
        torch.set_num_threads(threads)
    shard = _SharedShard(tasks, jobs, workspace_for(device), stop)
    try:
        shard.run()
        shard.commit()
    except BaseException:  # reading the base or an adapter failed, or the task was stopped
        shard.abort()
        raise
    finally:
        shard.hasher.close()
        torch.set_num_threads(threads_before)
    seconds = time.perf_counter() - started
    return [shard.result(output, device, seconds) for output in shard.outputs]


def merge_shard(task: ShardTask, job: MergeJob, device: str = "cpu", threads: int | None = None,
                stop: threading.Event | None = None) -> ShardResult:
    """Write the merged shard of one output (see merge_shard_outputs); its failure is raised."""
    (result,) = merge_shard_outputs([task], [job], device, threads, stop)
    if isinstance(result, BaseException):
        raise result
    return result
