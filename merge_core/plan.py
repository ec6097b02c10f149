"""The merge plan: a pure function from checkpoint and adapter descriptions to per-shard tasks.

Everything that can be wrong with the inputs' shapes is found here, before any task runs or
any byte is written: a task only ever meets I/O failures.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

from merge_core.adapter import EMBEDDING_LAYERS, WEIGHTS_NAME, LoraAdapter, ModuleUpdate
from merge_core.checkpoint import UNVALIDATED_SINGLE_NAME, BaseCheckpoint, Shard
from merge_core.combine import CombineSpec, check_combine
from merge_core.errors import InputError
from merge_core.safetensors_format import DTYPE_BYTES, FLOAT_DTYPES, TensorInfo

# Update kinds that add a ΔW (and so can be weighted and combined).
ADDITIVE_KINDS = ("lora", "conv", "embedding", "bias", "loha", "lokr", "dora")
COMBINABLE_KINDS = ("lora", "conv", "embedding", "bias", "loha", "lokr")
# A worker's fixed memory: interpreter and torch, the read-ahead and write-behind windows, and
# the cache-sized blocks of the fuse.
FIXED_WORKER_BYTES = 768 * 1024 * 1024


@dataclass(frozen=True)
class Update:
    """One adapter's update of one base tensor (see merge_core.adapter.KINDS)."""
    adapter: int  # index into the plan's adapter URIs
    data_start: int  # where the adapter file's tensor data begins
    kind: str
    factors: tuple[TensorInfo, ...]  # the adapter tensors it reads, in the order the fuse takes them
    roles: tuple[str, ...]
    scale: float  # the adapter's own scale (alpha/r), without its --weight
    weight: float = 1.0  # the adapter's --weight
    transpose: bool = False  # W stored in×out (fan_in_fan_out, embeddings): ΔW is transposed


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
        """What the worker needs at its peak, whatever the shard's size: for the largest fused
        tensor, ΔW in float32 (a second buffer when several updates sum), and the tensor's bytes
        twice (one being fused in place, the one before it still being written), plus the fixed part."""
        by_name = {t.name: t for t in self.shard.header.tensors}
        largest = 0
        for target in self.targets:
            info = by_name[target.tensor]
            compute = 8 if info.dtype == "F64" else 4
            per_element = compute * (2 if len(target.updates) > 1 else 1) + 2 * DTYPE_BYTES[info.dtype]
            largest = max(largest, per_element * info.numel)
        return FIXED_WORKER_BYTES + largest


@dataclass(frozen=True)
class MergePlan:
    base_uri: str
    adapter_uris: tuple[str, ...]
    tasks: tuple[ShardTask, ...]
    sequential: bool = False  # round after each adapter, in order (PEFT's merge_and_unload), not once
    combine: CombineSpec | None = None  # --combine: TIES/DARE/magnitude pruning of the adapters' deltas

    @property
    def arithmetic(self) -> dict:
        """How several adapters' updates are put together, for the manifest and the resume journal."""
        return {"rounding": "after each adapter" if self.sequential else "once",
                "combine": None if self.combine is None else dataclasses.asdict(self.combine)}

    @property
    def fused_tensor_count(self) -> int:
        return sum(len(t.targets) for t in self.tasks)

    @property
    def read_bytes(self) -> int:
        return sum(t.read_bytes for t in self.tasks)

    @property
    def write_bytes(self) -> int:
        return sum(t.shard.size for t in self.tasks)


def _expected_shape(update: ModuleUpdate) -> tuple[int, ...] | None:
    """The shape of the base tensor an update fits, from its factors (None: checked by size)."""
    if update.kind in ("lora", "embedding", "dora", "conv"):
        a, b = update.factor("A"), update.factor("B")
        if len(a.shape) > 2:
            return (b.shape[0], a.shape[1], *a.shape[2:])
        shape = (b.shape[0], a.shape[1])
        return shape[::-1] if update.transpose else shape
    if update.kind == "bias":
        return tuple(update.factors[0].shape)
    if update.kind == "replace":
        return tuple(update.factors[0].shape)
    return None


def _fits(update: ModuleUpdate, info: TensorInfo) -> bool:
    expected = _expected_shape(update)
    if expected is not None:
        return tuple(info.shape) == expected
    if update.kind == "ia3":
        vector = update.factors[0].numel
        if update.roles[0] == "bias":
            return info.numel == vector
        dims = (info.shape[1], info.shape[0]) if update.transpose else tuple(info.shape[:2])
        side = dims[1] if update.roles[0] == "in" else dims[0]
        return len(info.shape) >= 2 and vector == side
    return True  # loha/lokr: ΔW is reshaped to W's shape, which fails on another size


def _check_same_base(adapters: Sequence[LoraAdapter]) -> None:
    """Adapters trained on different bases (by base_model_name_or_path, where both say) are refused."""
    named = [(a.uri, a.config.get("base_model_name_or_path")) for a in adapters]
    named = [(uri, name) for uri, name in named if name]
    for uri, name in named[1:]:
        if name != named[0][1]:
            raise InputError(uri, f"was trained on {name!r}, but {named[0][0]} on {named[0][1]!r}",
                             "merge adapters of one base, or pass --allow-base-mismatch if the bases are the same "
                             "weights under other names")


def _tied_target(base: BaseCheckpoint, update: ModuleUpdate, subject: str) -> ModuleUpdate:
    """An update of the output head of a model whose head is tied to its input embedding (only
    the embedding is stored) updates the embedding, as PEFT's in-place merge into the shared
    tensor does; the model stays tied (so does PEFT's copy of the shared tensor, saved as
    lm_head.base_layer.weight). A trained head of its own (modules_to_save) would untie them:
    refused for now."""
    tied = base.tied_embedding
    if update.target in base.weight_map or tied is None or update.module.rpartition(".")[2] != "lm_head":
        return update
    if update.kind == "replace" and ".base_layer." not in update.factors[0].name:
        raise InputError(subject, f"is a trained copy of {update.target}, which the base ties to {tied}; merging it "
                         "would untie them, which lora-merge does not write yet",
                         "merge this adapter with PEFT's merge_and_unload for now")
    return dataclasses.replace(update, target=tied)


def _check_target(base: BaseCheckpoint, update: ModuleUpdate, subject: str) -> TensorInfo:
    shard_name = base.weight_map.get(update.target)
    if shard_name is None:
        raise InputError(subject, f"targets {update.target}, which the base checkpoint does not have",
                         "check that the adapter was trained on this base model")
    info = base.shard(shard_name).header.tensor(update.target)
    if info.dtype not in FLOAT_DTYPES:
        raise InputError(f"{base.uri}/{shard_name}: tensor {update.target}", f"is {info.dtype}; an adapter can only "
                         f"be merged into {', '.join(FLOAT_DTYPES)}", "merge into an unquantized base checkpoint")
    if not _fits(update, info):
        expected = _expected_shape(update)
        what = (f"is {list(info.shape)} in the base, the adapter's copy is {list(expected)}"
                if update.kind == "replace" else
                f"delta shape {list(expected) if expected else [f.shape for f in update.factors]} does not fit "
                f"{update.target} of shape {list(info.shape)}")
        fix = ("resized vocabularies are not merged yet: merge with PEFT after resize_token_embeddings"
               if update.kind == "replace" and update.module.rpartition(".")[2] in EMBEDDING_LAYERS
               else "check that the adapter was trained on this base model")
        raise InputError(subject, what, fix)
    return info


def plan_merge(base: BaseCheckpoint, adapters: Sequence[LoraAdapter], weights: Sequence[float],
               sequential: bool = False, combine: CombineSpec | None = None,
               allow_base_mismatch: bool = False) -> MergePlan:
    """One task per base shard, each listing the updates for the tensors it holds."""
    if combine is not None:
        check_combine(combine)
        if sequential:
            raise InputError("--sequential", "cannot be combined with --combine, which merges the deltas into one",
                             "pass one of them")
    if not allow_base_mismatch:
        _check_same_base(adapters)
    if len(weights) != len(adapters):
        raise InputError("--weight", f"{len(weights)} weight(s) for {len(adapters)} adapter(s)",
                         "give one --weight per --adapter, or none")
    if not all(math.isfinite(w) for w in weights):
        raise InputError("--weight", f"weights {list(weights)} are not all finite numbers", "give finite weights")
    updates: dict[str, list[Update]] = {}
    for index, (adapter, weight) in enumerate(zip(adapters, weights)):
        for update in adapter.updates:
            subject = f"{adapter.uri}/{WEIGHTS_NAME}: tensor {update.factors[0].name}"
            if update.kind == "ia3" and update.roles[0] == "bias" and update.target not in base.weight_map:
                continue  # IA3 scales the bias of output-side layers that have one
            update = _tied_target(base, update, subject)
            _check_target(base, update, subject)
            if combine is not None and update.kind not in COMBINABLE_KINDS:
                raise InputError(subject, f"updates {update.target} by {update.kind}, which --combine cannot prune "
                                 "(it combines additive deltas)", "merge this adapter without --combine")
            if weight != 1 and update.kind not in ADDITIVE_KINDS:
                raise InputError(f"--weight {weight:g}", f"{adapter.uri} updates {update.target} by {update.kind}, "
                                 "which is not a sum: it cannot be weighted", "give this adapter weight 1")
            if update.kind == "replace" and any(u.kind == "replace" for u in updates.get(update.target, ())):
                raise InputError(subject, f"a second adapter also replaces {update.target} with its own copy",
                                 "merge adapters that save whole copies of a module one at a time")
            updates.setdefault(update.target, []).append(Update(
                index, adapter.header.data_start, update.kind, update.factors, update.roles, update.scale, weight,
                update.transpose))

    tasks = []
    for shard in base.shards:
        targets = tuple(FuseTarget(t.name, tuple(updates[t.name])) for t in shard.header.tensors
                        if t.name in updates)
        unvalidated = UNVALIDATED_SINGLE_NAME if not base.indexed else shard.name
        tasks.append(ShardTask(shard, targets, unvalidated))
    return MergePlan(base.uri, tuple(a.uri for a in adapters), tuple(tasks), sequential, combine)
