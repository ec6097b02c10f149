"""Merge one base shard: stream it from storage, fuse the planned tensors, stream the result out.

This is the whole of a worker's job, with no scheduler in sight: the Ray task in jobs/ only
calls merge_shard(). Reads run ahead on a thread pool (prefetch), uploads run behind on the
writer's, and this thread fuses and hashes in between. The worker holds a bounded window of
read-ahead bytes plus one fused tensor's working set, never the whole shard; untouched
tensors are copied byte for byte.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections import Counter
from functools import partial
from typing import Callable, Iterator, Sequence

import torch

from merge_core.errors import ValidationError
from merge_core.format.shard_writer import ShardStreamWriter
from merge_core.format.tensors import resized, tensor_from_bytes
from merge_core.io.pipeline import DEFAULT_CHUNK_BYTES, Behind, Item, Read, read_ahead
from merge_core.io.registry import open_storage
from merge_core.io.storage import Storage, StorageOptions
from merge_core.names import ADAPTER_WEIGHTS_NAME
from merge_core.numerics.combine import CombineSpec, combine_deltas
from merge_core.numerics.fuse import Term, fuse_into
from merge_core.numerics.stats import FuseStats
from merge_core.numerics.workspace import Workspace, workspace_for
from merge_core.planning.plan import FuseTarget, ShardTask
from merge_core.worker.shard_result import ShardResult, check_stored

_HEADER, _COPY = "header", "copy"


def _items(task: ShardTask, base: Storage, adapters: Sequence[Storage]) -> Iterator[Item[FuseTarget | str]]:
    """The shard in file order: the header; runs of untouched tensors, in chunks; each tensor to
    fuse, with its adapter factors. Every base byte is read exactly once, in order, so the
    base's sha256 comes for free."""
    header = task.shard.header
    yield Item(_HEADER, (Read(base, task.name, 0, header.data_start),))
    targets = {t.tensor: t for t in task.targets}
    # Factors several tensors read (the experts of one MoE layer share lora_B) are read once.
    uses = Counter((u.adapter, f.start, f.nbytes) for t in task.targets for u in t.updates for f in u.factors)

    def fuse_item(target: FuseTarget) -> Item[FuseTarget]:
        info = header.tensor(target.base_tensor)
        factors = tuple(Read(adapters[u.adapter], ADAPTER_WEIGHTS_NAME, u.data_start + f.start, f.nbytes,
                             shared=uses[(u.adapter, f.start, f.nbytes)] > 1)
                        for u in target.updates for f in u.factors)
        return Item(target, (Read(base, task.name, header.data_start + info.start, info.nbytes), *factors))

    run_start = None
    for info in header.tensors:
        target = targets.get(info.name)
        if target is None:
            run_start = info.start if run_start is None else run_start
            continue
        if run_start is not None:
            yield from _copy_items(base, task.name, header.data_start + run_start, info.start - run_start)
            run_start = None
        yield fuse_item(target)
    if run_start is not None:
        end = header.tensors[-1].end
        yield from _copy_items(base, task.name, header.data_start + run_start, end - run_start)
    # Tensors new to the shard (an untied output head) follow, read again from their base tensor.
    yield from (fuse_item(t) for t in task.targets if t.source is not None)


def _copy_items(base: Storage, name: str, offset: int, length: int) -> Iterator[Item[str]]:
    for start in range(offset, offset + length, DEFAULT_CHUNK_BYTES):
        yield Item(_COPY, (Read(base, name, start, min(DEFAULT_CHUNK_BYTES, offset + length - start)),))


def update_terms(target: FuseTarget, factor_bytes: Sequence, combining: bool = False) -> list[Term]:
    """The fuse's terms from the bytes read for a target's updates (each update's factors, in
    turn). Each adapter's --weight is folded into its scale, unless the adapters are combined
    (--combine), which weighs their full deltas itself."""
    remaining = iter(factor_bytes)
    terms = []
    for u in target.updates:
        side = u.roles[0] if u.kind == "ia3" else ""  # IA3's one role says which side its vector scales
        roles = ("l",) if side else u.roles
        tensors = {role: tensor_from_bytes(next(remaining), f.dtype, f.shape) for role, f in zip(roles, u.factors)}
        terms.append(Term(u.kind, tensors, u.scale if combining else u.scale * u.weight, u.transpose, side,
                          u.experts))
    return terms


def _fuse_target(task: ShardTask, target: FuseTarget, data: list, workspace: Workspace,
                 before_writing: Callable[[], object], sequential: bool, combine: CombineSpec | None
                 ) -> tuple[memoryview, FuseStats]:
    """Fuse one tensor in the buffer its bytes were read into, which then holds the merged bytes
    (in a buffer of its own when an adapter resizes it)."""
    info = task.shard.header.tensor(target.base_tensor)
    buffer = data[0]
    weight = tensor_from_bytes(buffer, info.dtype, info.shape)
    if target.shape is not None:
        buffer, weight = resized(weight, target.shape)
    combiner = None
    if combine is not None:
        weights = [u.weight for u in target.updates]  # the plan allows only additive updates with --combine
        combiner = partial(combine_deltas, weights=weights, spec=combine, tensor_name=target.tensor)
    stats = fuse_into(weight, update_terms(target, data[1:], combine is not None), workspace, before_writing,
                      sequential, combiner)
    return buffer, stats


class _Laps:
    """Wall time split into buckets: each lap() charges the time since the previous one."""

    def __init__(self) -> None:
        self.seconds = {"wait": 0.0, "fuse": 0.0, "write": 0.0}
        self._mark = time.perf_counter()

    def lap(self, bucket: str) -> None:
        now = time.perf_counter()
        self.seconds[bucket] += now - self._mark
        self._mark = now


def merge_shard(task: ShardTask, base_uri: str, adapter_uris: Sequence[str], output_uri: str,
                device: str = "cpu", options: StorageOptions = StorageOptions(), allow_nonfinite: bool = False,
                read_back: bool = True, threads: int | None = None, sequential: bool = False,
                combine: CombineSpec | None = None) -> ShardResult:
    """Write the merged shard. With read_back, the published bytes are read again and hashed.
    A fused tensor that gains NaN/Inf fails the shard (ValidationError) unless allow_nonfinite.
    `threads`: the CPU cores the float32 math may use (the task's share of the node).
    `sequential`: several adapters are merged one after another, rounding after each (PEFT's
    merge_and_unload); else W + ΣΔW is rounded once. `combine`: TIES/DARE/... of the deltas."""
    started = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    base, output = open_storage(base_uri, options), open_storage(output_uri, options)
    adapters = [open_storage(u, options) for u in adapter_uris]
    header = task.shard.header
    torch_device = torch.device(device)
    workspace = workspace_for(torch_device)
    base_sha = hashlib.sha256()
    hasher = Behind("hash-base")
    fused_stats: list[tuple[str, FuseStats]] = []

    stream = ShardStreamWriter(output.open_writer(task.output_name), task.output_tensors, header.metadata)
    layout = {i.name: i for i in stream.layout}
    try:
        laps = _Laps()
        for tag, data in read_ahead(list(_items(task, base, adapters))):
            laps.lap("wait")
            new_tensor = isinstance(tag, FuseTarget) and tag.source is not None
            # every base byte once, in order: a new tensor's bytes were read a second time
            hashed = hasher.submit(base_sha.update, b"" if new_tensor else data[0])
            if isinstance(tag, FuseTarget):
                merged, stats = _fuse_target(task, tag, data, workspace, hashed.result, sequential, combine)
                if stats.nonfinite_introduced and not allow_nonfinite:
                    raise ValidationError([f"{base.describe(task.name)}: tensor {tag.tensor}: fusing produced "
                                           f"{stats.nonfinite_introduced} NaN/Inf values the base did not have "
                                           "(check the adapter, or pass --allow-nonfinite)"])
                fused_stats.append((tag.tensor, stats))
                laps.lap("fuse")
                stream.write_tensor(layout[tag.tensor], merged)
            elif tag is _COPY:
                stream.write_data(data[0])
            laps.lap("write")  # the base's own header is only hashed: the output has its own
        size, sha = stream.commit()
        hasher.drain()
        laps.lap("write")
        if read_back:
            check_stored(output, task.output_name, size, sha)
            laps.lap("wait")
    except BaseException:
        try:
            stream.abort()
        except Exception:  # the failure that brought us here is the one to report
            pass
        raise
    finally:
        hasher.close()
    return ShardResult(task.name, size, sha, base_sha.hexdigest(), len(stream.layout), len(task.targets),
                       laps.seconds["wait"], laps.seconds["fuse"], laps.seconds["write"],
                       time.perf_counter() - started, str(torch_device), socket.gethostname(), tuple(fused_stats))
