"""The merge plan: a pure function from checkpoint and adapter descriptions to per-shard tasks.

Everything that can be wrong with the inputs' shapes is found here, before any task runs or
any byte is written: a task only ever meets I/O failures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from merge_core.adapter import WEIGHTS_NAME, LoraAdapter
from merge_core.checkpoint import UNVALIDATED_SINGLE_NAME, BaseCheckpoint, Shard
from merge_core.errors import InputError
from merge_core.safetensors_format import FLOAT_DTYPES, TensorInfo

# Bytes a worker holds per element of the tensor it fuses: the base tensor's bytes as read (and
# their chunks), W in float32, ΔW, |ΔW| for the report, the rounded result and its copy on its
# way out (about 2 + 2 + 4 + 4 + 4 + 2 + 2 for bf16; float32 bases stay within the same sum).
FUSE_BYTES_PER_ELEMENT = 20
FIXED_WORKER_BYTES = 768 * 1024 * 1024  # interpreter, torch, read-ahead and write-behind windows


@dataclass(frozen=True)
class Update:
    """One adapter's contribution to one base tensor: += scale · (B @ A), or, for a bias
    (lora_bias), += scale · b with `a` None and `b` the lora_B bias."""
    adapter: int  # index into the plan's adapter URIs
    data_start: int  # where the adapter file's tensor data begins
    a: TensorInfo | None
    b: TensorInfo
    scale: float  # the adapter's LoRA scale times its --weight
    transpose: bool = False  # fan_in_fan_out: the base stores this weight in×out

    @property
    def factors(self) -> tuple[TensorInfo, ...]:
        """The adapter tensors it reads, in the order the fuse takes them."""
        return (self.b,) if self.a is None else (self.a, self.b)


@dataclass(frozen=True)
class FuseTarget:
    tensor: str
    updates: tuple[Update, ...]


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
        return sum(f.nbytes for t in self.targets for u in t.updates for f in u.factors)

    @property
    def read_bytes(self) -> int:
        return self.shard.size + self.adapter_bytes

    @property
    def memory_bytes(self) -> int:
        """What the worker needs at its peak: the largest fused tensor's working set, plus a margin."""
        by_name = {t.name: t for t in self.shard.header.tensors}
        largest = max((by_name[t.tensor].numel for t in self.targets), default=0)
        return FIXED_WORKER_BYTES + FUSE_BYTES_PER_ELEMENT * largest


@dataclass(frozen=True)
class MergePlan:
    base_uri: str
    adapter_uris: tuple[str, ...]
    tasks: tuple[ShardTask, ...]

    @property
    def fused_tensor_count(self) -> int:
        return sum(len(t.targets) for t in self.tasks)

    @property
    def read_bytes(self) -> int:
        return sum(t.read_bytes for t in self.tasks)

    @property
    def write_bytes(self) -> int:
        return sum(t.shard.size for t in self.tasks)


def _check_target(base: BaseCheckpoint, adapter: LoraAdapter, target: str, delta_shape: tuple[int, ...],
                  subject: str) -> None:
    shard_name = base.weight_map.get(target)
    if shard_name is None:
        raise InputError(subject, f"targets {target}, which the base checkpoint does not have",
                         "check that the adapter was trained on this base model")
    info = base.shard(shard_name).header.tensor(target)
    if info.dtype not in FLOAT_DTYPES:
        raise InputError(f"{base.uri}/{shard_name}: tensor {target}", f"is {info.dtype}; a LoRA delta can only be "
                         f"fused into {', '.join(FLOAT_DTYPES)}", "merge into an unquantized base checkpoint")
    if info.shape != delta_shape:
        raise InputError(subject, f"delta shape {list(delta_shape)} does not fit {target} of shape {list(info.shape)}",
                         "check that the adapter was trained on this base model")


def plan_merge(base: BaseCheckpoint, adapters: Sequence[LoraAdapter], weights: Sequence[float]) -> MergePlan:
    """One task per base shard, each listing the updates for the tensors it holds."""
    if len(weights) != len(adapters):
        raise InputError("--weight", f"{len(weights)} weight(s) for {len(adapters)} adapter(s)",
                         "give one --weight per --adapter, or none")
    if not all(math.isfinite(w) for w in weights):
        raise InputError("--weight", f"weights {list(weights)} are not all finite numbers", "give finite weights")
    updates: dict[str, list[Update]] = {}
    for index, (adapter, weight) in enumerate(zip(adapters, weights)):
        for pair in adapter.pairs:
            subject = f"{adapter.uri}/{WEIGHTS_NAME}: tensor {pair.a.name}"
            _check_target(base, adapter, pair.target, pair.delta_shape, subject)
            updates.setdefault(pair.target, []).append(Update(index, adapter.header.data_start, pair.a, pair.b,
                                                              pair.scale * weight, pair.transpose))
            if pair.bias is not None:
                bias_target = f"{pair.module}.bias"
                _check_target(base, adapter, bias_target, tuple(pair.bias.shape),
                              f"{adapter.uri}/{WEIGHTS_NAME}: tensor {pair.bias.name}")
                updates.setdefault(bias_target, []).append(Update(index, adapter.header.data_start, None, pair.bias,
                                                                  pair.scale * weight))

    tasks = []
    for shard in base.shards:
        targets = tuple(FuseTarget(t.name, tuple(updates[t.name])) for t in shard.header.tensors
                        if t.name in updates)
        unvalidated = UNVALIDATED_SINGLE_NAME if not base.indexed else shard.name
        tasks.append(ShardTask(shard, targets, unvalidated))
    return MergePlan(base.uri, tuple(a.uri for a in adapters), tuple(tasks))
