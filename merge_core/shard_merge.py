"""Merge one base shard: stream it from storage, fuse the planned tensors, stream the result out.

This is the whole of a worker's job, with no scheduler in sight: the Ray task in jobs/ only
calls merge_shard(). The worker never holds more than one fused tensor (plus its adapter
factors) or one copy chunk; untouched tensors are copied byte for byte in chunks.
"""

from __future__ import annotations

import hashlib
import socket
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from merge_core.adapter import WEIGHTS_NAME
from merge_core.fuse import fuse, tensor_from_bytes, tensor_to_bytes
from merge_core.plan import FuseTarget, ShardTask, Update
from merge_core.shard_writer import ShardStreamWriter
from merge_core.storage import COPY_CHUNK_BYTES, Storage, StorageOptions, open_storage


@dataclass(frozen=True)
class ShardResult:
    """What a task returns through Ray: small, no tensors."""
    name: str
    size: int
    sha256: str
    base_sha256: str
    tensors: int
    fused: int
    read_seconds: float
    fuse_seconds: float
    write_seconds: float
    seconds: float
    device: str
    node: str


@dataclass(frozen=True)
class _Copy:
    start: int  # data-relative byte range of consecutive untouched tensors
    end: int


def _segments(task: ShardTask) -> Iterator[_Copy | FuseTarget]:
    """The shard in file order: runs of untouched tensors coalesced into one copy each."""
    targets = {t.tensor: t for t in task.targets}
    run: _Copy | None = None
    for info in task.shard.header.tensors:
        target = targets.get(info.name)
        if target is None:
            run = _Copy(run.start if run else info.start, info.end)
            continue
        if run:
            yield run
            run = None
        yield target
    if run:
        yield run


def _read_factor(storage: Storage, update: Update, side: str) -> torch.Tensor:
    info = update.a if side == "A" else update.b
    data = storage.read_range(WEIGHTS_NAME, update.data_start + info.start, info.nbytes)
    return tensor_from_bytes(data, info.dtype, info.shape)


class _Timer:
    def __init__(self) -> None:
        self.read = self.fuse = self.write = 0.0

    def add(self, field: str, since: float) -> float:
        now = time.perf_counter()
        setattr(self, field, getattr(self, field) + now - since)
        return now


def merge_shard(task: ShardTask, base_uri: str, adapter_uris: Sequence[str], output_uri: str,
                device: str = "cpu", options: StorageOptions = StorageOptions()) -> ShardResult:
    started = time.perf_counter()
    base, output = open_storage(base_uri, options), open_storage(output_uri, options)
    adapters = [open_storage(u, options) for u in adapter_uris]
    header = task.shard.header
    torch_device = torch.device(device)
    timer = _Timer()
    base_sha = hashlib.sha256()

    t = time.perf_counter()
    base_sha.update(base.read_range(task.name, 0, header.data_start))
    t = timer.add("read", t)
    stream = ShardStreamWriter(output.open_writer(task.name),
                               [(i.name, i.dtype, i.shape) for i in header.tensors], header.metadata)
    try:
        if [(i.start, i.end) for i in stream.layout] != [(i.start, i.end) for i in header.tensors]:
            raise RuntimeError(f"{task.name}: output layout differs from the base layout")
        t = timer.add("write", t)
        for segment in _segments(task):
            if isinstance(segment, _Copy):
                for chunk in base.iter_range(task.name, header.data_start + segment.start,
                                             segment.end - segment.start, COPY_CHUNK_BYTES):
                    base_sha.update(chunk)
                    t = timer.add("read", t)
                    stream.write_data(chunk)
                    t = timer.add("write", t)
                continue
            info = header.tensor(segment.tensor)
            raw = base.read_range(task.name, header.data_start + info.start, info.nbytes)
            base_sha.update(raw)
            factors = [(_read_factor(adapters[u.adapter], u, "A"), _read_factor(adapters[u.adapter], u, "B"), u.scale)
                       for u in segment.updates]
            t = timer.add("read", t)
            weight = tensor_from_bytes(raw, info.dtype, info.shape).to(torch_device)
            merged = tensor_to_bytes(fuse(weight, [(a.to(torch_device), b.to(torch_device), s)
                                                   for a, b, s in factors]))
            t = timer.add("fuse", t)
            stream.write_tensor(info, merged)
            t = timer.add("write", t)
        size, sha = stream.commit()
        timer.add("write", t)
    except BaseException:
        stream.abort()
        raise
    return ShardResult(task.name, size, sha, base_sha.hexdigest(), len(header.tensors), len(task.targets),
                       timer.read, timer.fuse, timer.write, time.perf_counter() - started, str(torch_device),
                       socket.gethostname())
