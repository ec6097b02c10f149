"""What a shard task reads, in file order, to write one merged shard or several from one read of
the base shard.

Every base byte is read once and in order (so the base's digest comes for free): the header; runs
of tensors no output changes, in chunks, which every output copies as they are; each tensor some
output changes (or moves beside a quantized weight's codes), whole, followed by one item per
output that fuses it with that output's own reads (its adapter factors, a quantized weight's
other parts). A task holds one base tensor at a time whatever the number of outputs, and each
output's reads arrive just after it. Tensors new to a shard (an untied output head) come last,
read again from their base tensor for each output that adds them, as a single merge does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from merge_core.format.header import TensorInfo
from merge_core.io.pipeline import DEFAULT_CHUNK_BYTES, Item, Read
from merge_core.io.storage import Storage
from merge_core.planning.plan import FuseTarget, ShardTask
from merge_core.worker.merged_tensor import shared_factors, tensor_reads

HEADER = "header"


@dataclass(frozen=True)
class Copy:
    """Bytes at `offset` of the base shard that every output copies as they are (a store may copy
    them itself: merge_core.io.storage.ObjectWriter.write_copy)."""
    offset: int


@dataclass(frozen=True)
class BaseTensor:
    """A base tensor some output does not copy as it is: read whole, kept while its fuses follow."""
    info: TensorInfo


@dataclass(frozen=True)
class Fuse:
    """Output `output` fuses `target`. Its item's reads are the output's own; the base tensor's
    bytes are those of the BaseTensor before it, unless `new` (then its reads include them).
    `in_place`: the last use of those bytes, fused where they lie (no output copies them)."""
    output: int
    target: FuseTarget
    in_place: bool = False
    new: bool = False


@dataclass(frozen=True)
class Roles:
    """What one output does with the base tensors of the shard: fuse them (by the base tensor the
    fuse starts from: a quantized weight's codes) or move them (written beside their codes)."""
    fused: dict[str, FuseTarget]
    moved: frozenset[str]

    @classmethod
    def of(cls, task: ShardTask) -> "Roles":
        fused = {(t.parts[0].info.name if t.parts else t.tensor): t for t in task.targets if t.source is None}
        return cls(fused, frozenset(task.moved))

    def copies(self, name: str) -> bool:
        return name not in self.fused and name not in self.moved


def shard_items(tasks: Sequence[ShardTask], base: Storage,
                adapters: Sequence[Sequence[Storage]]) -> Iterator[Item]:
    """The items of one base shard for the outputs whose tasks (of one shard) are `tasks`, each
    output reading its adapters from `adapters[i]`."""
    header, name = tasks[0].shard.header, tasks[0].name
    yield Item(HEADER, (Read(base, name, 0, header.data_start),))
    roles = [Roles.of(task) for task in tasks]
    uses = [shared_factors(task) for task in tasks]
    run_start = None
    for info in header.tensors:
        if all(r.copies(info.name) for r in roles):
            run_start = info.start if run_start is None else run_start
            continue
        if run_start is not None:
            yield from _chunks(base, name, header.data_start + run_start, info.start - run_start)
            run_start = None
        whole = Read(base, name, header.data_start + info.start, info.nbytes)
        yield Item(BaseTensor(info), (whole,))
        fusing = [i for i, r in enumerate(roles) if info.name in r.fused]
        nobody_copies = not any(r.copies(info.name) for r in roles)
        for i in fusing:
            target = roles[i].fused[info.name]
            reads = tensor_reads(tasks[i], target, base, adapters[i], uses[i])
            if reads[0].key != whole.key:
                raise RuntimeError(f"{name}: {target.tensor} does not start from base tensor {info.name}")
            yield Item(Fuse(i, target, in_place=nobody_copies and i == fusing[-1]), reads[1:])
    if run_start is not None:
        yield from _chunks(base, name, header.data_start + run_start, header.tensors[-1].end - run_start)
    for i, task in enumerate(tasks):
        for target in task.targets:
            if target.source is not None:
                yield Item(Fuse(i, target, new=True), tensor_reads(task, target, base, adapters[i], uses[i]))


def _chunks(base: Storage, name: str, offset: int, length: int) -> Iterator[Item]:
    for start in range(offset, offset + length, DEFAULT_CHUNK_BYTES):
        yield Item(Copy(start), (Read(base, name, start, min(DEFAULT_CHUNK_BYTES, offset + length - start)),))
