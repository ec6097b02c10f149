"""Merge one base shard: stream it from storage, fuse the planned tensors, stream the result out.

This is the whole of a worker's job, with no scheduler in sight: the Ray task in jobs/ only
calls merge_shard(). Reads run ahead on a thread pool (prefetch), uploads run behind on the
writer's, and this thread fuses and hashes in between. The worker holds a bounded window of
read-ahead bytes plus one fused tensor's working set, never the whole shard; untouched
tensors are copied byte for byte.
"""

from __future__ import annotations

import socket
import time
from typing import Iterator, Sequence

import torch

from merge_core.errors import ValidationError
from merge_core.format.shard_writer import ShardStreamWriter
from merge_core.io.hashing import TimedSha256
from merge_core.io.pipeline import DEFAULT_CHUNK_BYTES, Behind, Item, Read, read_ahead
from merge_core.io.registry import open_storage
from merge_core.io.storage import Storage
from merge_core.numerics.stats import FuseStats
from merge_core.numerics.workspace import Workspace, workspace_for
from merge_core.planning.plan import FuseTarget, ShardTask
from merge_core.worker.job import MergeJob
from merge_core.worker.merged_tensor import merged_tensor, shared_factors, tensor_reads
from merge_core.worker.original import OriginalShard
from merge_core.worker.shard_result import ShardResult, check_stored

_HEADER, _COPY, _MOVED = "header", "copy", "moved"


def _items(task: ShardTask, base: Storage, adapters: Sequence[Storage]) -> Iterator[Item[FuseTarget | str]]:
    """The shard in file order: the header; runs of untouched tensors, in chunks; each tensor to
    fuse, with its adapter factors (a quantized weight where its codes are, with all its parts);
    the parts written with their codes, read here only to be hashed. Every base byte is read in
    order, so the base's sha256 comes for free."""
    header = task.shard.header
    yield Item(_HEADER, (Read(base, task.name, 0, header.data_start),))
    targets = {(t.parts[0].info.name if t.parts else t.tensor): t for t in task.targets if t.source is None}
    moved = set(task.moved)
    uses = shared_factors(task)

    def fuse_item(target: FuseTarget) -> Item[FuseTarget]:
        return Item(target, tensor_reads(task, target, base, adapters, uses))

    run_start = None
    for info in header.tensors:
        target = targets.get(info.name)
        if target is None and info.name not in moved:
            run_start = info.start if run_start is None else run_start
            continue
        if run_start is not None:
            yield from _chunks(_COPY, base, task.name, header.data_start + run_start, info.start - run_start)
            run_start = None
        if target is not None:
            yield fuse_item(target)
        else:
            yield from _chunks(_MOVED, base, task.name, header.data_start + info.start, info.nbytes)
    if run_start is not None:
        end = header.tensors[-1].end
        yield from _chunks(_COPY, base, task.name, header.data_start + run_start, end - run_start)
    # Tensors new to the shard (an untied output head) follow, read again from their base tensor.
    yield from (fuse_item(t) for t in task.targets if t.source is not None)


def _chunks(tag: str, base: Storage, name: str, offset: int, length: int) -> Iterator[Item[str]]:
    for start in range(offset, offset + length, DEFAULT_CHUNK_BYTES):
        yield Item(tag, (Read(base, name, start, min(DEFAULT_CHUNK_BYTES, offset + length - start)),))


class _Laps:
    """Wall time split into buckets: each lap() charges the time since the previous one."""

    def __init__(self) -> None:
        self.seconds = {"wait": 0.0, "fuse": 0.0, "write": 0.0}
        self._mark = time.perf_counter()

    def lap(self, bucket: str) -> None:
        now = time.perf_counter()
        self.seconds[bucket] += now - self._mark
        self._mark = now


class _ShardStream:
    """One shard on its way through: base bytes hashed behind, tensors fused here, output written behind."""

    def __init__(self, task: ShardTask, job: MergeJob, base: Storage, stream: ShardStreamWriter,
                 workspace: Workspace):
        self.task, self.job, self.base, self.stream, self.workspace = task, job, base, stream, workspace
        self.layout = {i.name: i for i in stream.layout}
        self.base_sha = TimedSha256()
        self.hasher = Behind("hash-base")
        self.fused: list[tuple[str, FuseStats]] = []
        self.laps = _Laps()
        self.original = OriginalShard(job, task.name) if job.original_uri else None

    def run(self, items: Sequence[Item]) -> None:
        for tag, data in read_ahead(items):
            self.laps.lap("wait")
            new_tensor = isinstance(tag, FuseTarget) and tag.source is not None
            # every base byte once, in order: a new tensor's bytes were read a second time
            hashed = self.hasher.submit(self.base_sha.update, b"" if new_tensor else data[0])
            if isinstance(tag, FuseTarget):
                self.fuse(tag, data, hashed.result)
            elif tag is _COPY:
                self.stream.write_data(data[0])
            self.laps.lap("write")  # the base's own header is only hashed: the output has its own

    def fuse(self, target: FuseTarget, data: list, before_writing) -> None:
        outputs, fused = merged_tensor(self.task, target, data, self.job, self.workspace, before_writing)
        for name, stats in fused:
            if stats.nonfinite_introduced and not self.job.allow_nonfinite:
                raise ValidationError([f"{self.base.describe(self.task.name)}: tensor {name}: fusing produced "
                                       f"{stats.nonfinite_introduced} NaN/Inf values the base did not have "
                                       "(check the adapter, or pass --allow-nonfinite)"])
        if self.original is not None and target.quantized is None and not target.restore:
            fused = [(target.tensor, self.original.compare(target.tensor, outputs[0][1], fused[0][1]))]
        self.fused += fused
        self.laps.lap("fuse")
        for name, data in outputs:
            self.stream.write_tensor(self.layout[name], data)


def merge_shard(task: ShardTask, job: MergeJob, device: str = "cpu", threads: int | None = None) -> ShardResult:
    """Write the merged shard. With job.read_back, the published bytes are read again and hashed.
    A fused tensor that gains NaN/Inf fails the shard (ValidationError) unless job.allow_nonfinite.
    `device`: the torch device to fuse on; `threads`: the CPU cores the float32 math may use (the
    task's share of the node)."""
    started = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    base, output = open_storage(job.base_uri, job.storage), open_storage(job.output_uri, job.storage)
    adapters = [open_storage(u, job.storage) for u in job.adapter_uris]
    stream = ShardStreamWriter(output.open_writer(task.output_name), task.output_tensors, task.shard.header.metadata)
    shard = _ShardStream(task, job, base, stream, workspace_for(device))
    try:
        shard.run(list(_items(task, base, adapters)))
        size, sha = stream.commit()
        shard.hasher.drain()
        shard.laps.lap("write")
        if job.read_back:  # the size always; the bytes again where re-reading them proves something
            check_stored(output, task.output_name, size, sha, rehash=output.read_back_proves)
            shard.laps.lap("wait")
    except BaseException:
        try:
            stream.abort()
        except Exception:  # the failure that brought us here is the one to report
            pass
        raise
    finally:
        shard.hasher.close()
    laps = shard.laps.seconds
    return ShardResult(name=task.name, size=size, sha256=sha, base_sha256=shard.base_sha.hexdigest(),
                       tensors=len(stream.layout), fused=len(task.targets), read_wait_seconds=laps["wait"],
                       fuse_seconds=laps["fuse"], write_seconds=laps["write"], seconds=time.perf_counter() - started,
                       device=str(torch.device(device)), node=socket.gethostname(), fused_stats=tuple(shard.fused),
                       hash_seconds=shard.base_sha.seconds + stream.hash_seconds)
