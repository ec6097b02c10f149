"""The merge plan: per base shard, the tensors to fuse and the updates of each.

Plain frozen data, made by merge_core.planning.planner and handed to the workers as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from merge_core.format.header import DTYPE_BYTES, TensorInfo
from merge_core.format.quantization import QuantizedWeight
from merge_core.inputs.checkpoint import Shard
from merge_core.io.pipeline import DEFAULT_AHEAD_BYTES
from merge_core.kinds import ExpertShare, Kind
from merge_core.numerics.arithmetic import Arithmetic

# A worker's own memory whatever it merges: the interpreter, torch, Ray's core worker and the
# cache-sized blocks of the fuse (measured: about 220 MB for the first three on a CPU).
WORKER_BASE_BYTES = 384 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class Update:
    """One adapter's update of one base tensor (see merge_core.kinds)."""
    adapter: int  # index into the plan's adapter URIs
    data_start: int  # where the adapter file's tensor data begins
    kind: Kind
    factors: tuple[TensorInfo, ...]  # the adapter tensors it reads, in the order the fuse takes them
    roles: tuple[str, ...]
    scale: float  # the adapter's own scale (alpha/r), without its --weight
    weight: float = 1.0  # the adapter's --weight
    transpose: bool = False  # W stored in×out (fan_in_fan_out, embeddings): ΔW is transposed
    experts: ExpertShare | None = None  # param: the experts it covers
    side: str = ""  # ia3: "in", "out" or "bias"


@dataclass(frozen=True)
class StoredPart:
    """One stored tensor of a quantized weight (its codes, its scales), in whichever base shard."""
    role: str  # codes, scale, blocks, scales, packed, shape (merge_core.format.quantization)
    shard: str  # the base shard that stores it
    data_start: int  # where that shard's tensor data begins
    info: TensorInfo


@dataclass(frozen=True, kw_only=True)
class FuseTarget:
    tensor: str  # the tensor as the model holds it (a quantized weight's logical name)
    updates: tuple[Update, ...]
    # A tensor the base does not store (the output head of a model the merge unties) starts from
    # this base tensor of the same shard, and is written after the base's tensors.
    source: str | None = None
    shape: tuple[int, ...] | None = None  # the merged shape, where an adapter resized the tensor
    # A quantized weight: decoded to float32, fused, then encoded again in the base's format (or,
    # with `dequantize`, written as one bf16 tensor). Its parts are written together where the
    # largest of them (the codes) is: in this task's shard.
    quantized: QuantizedWeight | None = None
    parts: tuple[StoredPart, ...] = ()  # the quantized weight's stored tensors, the codes first
    dequantize: bool = False
    keep_scales: bool = False  # --scales keep: the base's scales, zero points and global scales kept
    # Fused siblings (q/k/v, gate/up, w1/w3) that may share this weight's tensor-level scale: merged
    # with it, so that a fresh shared scale covers them all, and written after it (--scales fresh)
    siblings: tuple["FuseTarget", ...] = ()
    # An unmerge of what cannot be computed back (DoRA, a whole copy): the original base's tensor
    restore: bool = False

    @property
    def base_tensor(self) -> str:
        return self.source or self.tensor

    @property
    def members(self) -> tuple["FuseTarget", ...]:
        """This target and its fused siblings, in the order they are read and written."""
        return (self, *self.siblings)

    @property
    def stored_parts(self) -> tuple[StoredPart, ...]:
        """Every stored tensor a quantized target reads and writes: its parts, then its siblings'."""
        return tuple(p for member in self.members for p in member.parts)

    @property
    def output_tensors(self) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
        """What the worker writes for a quantized target, in this order: each part as stored (then its
        siblings'), or the one bf16 tensor."""
        if self.dequantize:
            return ((self.tensor, self.quantized.dtype, self.quantized.shape),)
        return tuple((p.info.name, p.info.dtype, p.info.shape) for p in self.stored_parts)


@dataclass(frozen=True)
class ShardTask:
    shard: Shard
    targets: tuple[FuseTarget, ...]
    output_name: str  # where the worker writes it; renamed to `name` at publication if different

    @property
    def name(self) -> str:
        return self.shard.name

    @property
    def adapter_bytes(self) -> int:
        """Adapter bytes the worker reads (a factor several experts share, once)."""
        factors = {(u.adapter, f.start, f.nbytes) for t in self.targets for m in t.members for u in m.updates
                   for f in u.factors}
        return sum(nbytes for _, _, nbytes in factors)

    # Stored tensors of this shard the task does not copy where they stand: the other parts of the
    # quantized weights it re-encodes, written with their codes (here or in another shard's task).
    moved: tuple[str, ...] = ()

    @property
    def read_bytes(self) -> int:
        """The shard, the adapter factors, again the base tensors new tensors start from, and the parts
        of quantized weights read beside their codes."""
        again = sum(self.shard.header.tensor(t.source).nbytes for t in self.targets if t.source is not None)
        parts = sum(p.info.nbytes for t in self.targets for p in t.stored_parts[1:])
        return self.shard.size + self.adapter_bytes + again + parts

    @property
    def output_tensors(self) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
        """The merged shard's (name, dtype, shape) in file order: the base's tensors, resized where
        an adapter resized them, a quantized weight's parts together where its codes were, then the
        tensors new to it."""
        targets = {t.tensor: t for t in self.targets if t.quantized is None}
        by_codes = {t.parts[0].info.name: t for t in self.targets if t.quantized is not None}
        moved = set(self.moved)
        tensors = []
        for i in self.shard.header.tensors:
            if i.name in by_codes:
                tensors += by_codes[i.name].output_tensors
            elif i.name not in moved:
                target = targets.get(i.name)
                tensors.append((i.name, i.dtype, target.shape if target and target.shape else i.shape))
        for target in self.targets:
            if target.source is not None:
                info = self.shard.header.tensor(target.source)
                tensors.append((target.tensor, info.dtype, target.shape or info.shape))
        return tuple(tensors)

    @property
    def output_bytes(self) -> int:
        """The merged shard's tensor bytes."""
        return sum(DTYPE_BYTES[dtype] * math.prod(shape) for _, dtype, shape in self.output_tensors)

    @property
    def memory_bytes(self) -> int:
        """What the worker needs at its peak, whatever the shard's size: for the largest fused
        tensor, ΔW in float32 (a second buffer when several updates sum), and the tensor's bytes
        twice (one being fused in place, the one before it still being written), plus the base's
        bytes of a tensor an adapter resizes (read, then fused in a buffer of the new size), plus
        the read-ahead and write-behind windows (each at most the shard's size), plus the worker's
        own. A quantized weight is fused as float32 beside its float32 original and its
        re-decoded requantization (what the adapter kept), with its stored bytes twice."""
        by_name = {name: (dtype, shape) for name, dtype, shape in self.output_tensors}
        largest = 0
        for target in self.targets:
            if target.quantized is not None:  # siblings are held together
                need = sum((16 if m.updates else 4) * math.prod(m.quantized.shape) + 2 * sum(p.info.nbytes
                                                                                          for p in m.parts)
                           for m in target.members)
            else:
                dtype, shape = by_name[target.tensor]
                compute = 8 if dtype == "F64" else 4
                per_element = compute * (2 if len(target.updates) > 1 else 1) + 2 * DTYPE_BYTES[dtype]
                resized_from = self.shard.header.tensor(target.base_tensor).nbytes if target.shape else 0
                need = per_element * math.prod(shape) + resized_from
            largest = max(largest, need)
        return WORKER_BASE_BYTES + 2 * min(DEFAULT_AHEAD_BYTES, self.shard.size) + largest


def shared_memory_bytes(tasks: Sequence[ShardTask]) -> int:
    """What a task that writes one base shard into several outputs (`tasks`: each output's task of
    that shard) needs at its peak, whatever their number: the most any one of them needs alone,
    plus the base tensor kept while each output fuses its own copy of it, plus a second write
    window (the outputs' writers share one of twice one writer's)."""
    if len(tasks) == 1:
        return tasks[0].memory_bytes
    kept = max((t.parts[0].info.nbytes if t.parts else task.shard.header.tensor(t.base_tensor).nbytes
                for task in tasks for t in task.targets if t.source is None), default=0)
    return max(t.memory_bytes for t in tasks) + kept + DEFAULT_AHEAD_BYTES


@dataclass(frozen=True, kw_only=True)
class MergePlan:
    base_uri: str
    adapter_uris: tuple[str, ...]
    tasks: tuple[ShardTask, ...]
    arithmetic: Arithmetic = Arithmetic()
    # config.json keys the merge changes (vocab_size of a resized vocabulary, tie_word_embeddings)
    config_updates: Mapping[str, object] = field(default_factory=dict)
    # files taken from an adapter rather than the base: the tokenizer saved with the adapter that
    # resized the vocabulary (name → adapter URI); and the base's tokenizer files it replaces
    # as a whole, which the output leaves out
    file_sources: Mapping[str, str] = field(default_factory=dict)
    files_left_out: tuple[str, ...] = ()
    config_removed: tuple[str, ...] = ()  # config.json keys the merge drops (--dequantize: quantization_config)
    scales: str = "keep"  # --scales: how a quantized weight is requantized, fresh or keep

    @property
    def model_changes(self) -> dict:
        """What the merged model has that the base's layout had not, for the manifest."""
        resized = {f.tensor: [list(t.shard.header.tensor(f.tensor).shape), list(f.shape)]
                   for t in self.tasks for f in t.targets if f.shape is not None and f.source is None}
        added = {f.tensor: f.source for t in self.tasks for f in t.targets if f.source is not None}
        quantized = [m for t in self.tasks for f in t.targets if f.quantized is not None for m in f.members]
        return {"config": dict(self.config_updates), "config_removed": list(self.config_removed),
                "resized_tensors": resized, "added_tensors": added,
                "files_from_adapters": dict(self.file_sources), "base_files_left_out": list(self.files_left_out),
                "requantized_tensors": sum(1 for f in quantized if not f.dequantize),
                "dequantized_tensors": sum(1 for f in quantized if f.dequantize)}

    @property
    def fused_tensor_count(self) -> int:
        return sum(len(t.targets) for t in self.tasks)

    @property
    def read_bytes(self) -> int:
        return sum(t.read_bytes for t in self.tasks)

    @property
    def write_bytes(self) -> int:
        return sum(t.shard.header.data_start + t.output_bytes for t in self.tasks)  # headers: about the base's
