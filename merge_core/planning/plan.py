"""The merge plan: a pure function from checkpoint and adapter descriptions to per-shard tasks.

Everything that can be wrong with the inputs' shapes is found here, before any task runs or
any byte is written: a task only ever meets I/O failures.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from merge_core.errors import InputError
from merge_core.format.header import DTYPE_BYTES, FLOAT_DTYPES, TensorInfo
from merge_core.inputs.adapter import ROUNDED_DELTA_KINDS, LoraAdapter, ModuleUpdate
from merge_core.inputs.checkpoint import BaseCheckpoint, Shard
from merge_core.names import ADAPTER_WEIGHTS_NAME, TOKENIZER_FILES, UNVALIDATED_SINGLE_NAME
from merge_core.numerics.combine import CombineSpec, check_combine
from merge_core.planning.experts import expert_targets
from merge_core.planning.vocabulary import UNTIED_HEAD, check_vocabulary, config_updates, resizes, tied_target

# Update kinds that add a ΔW, and so can be weighted (--weight) and combined (--combine). DoRA
# is not one: its magnitude vector was trained for the whole ΔW it normalises.
ADDITIVE_KINDS = ("lora", "conv", "embedding", "bias", "loha", "lokr", "param")
# A worker's fixed memory: interpreter and torch, the read-ahead window (and the shared adapter
# factors it keeps), the write-behind window, and the cache-sized blocks of the fuse.
FIXED_WORKER_BYTES = 768 * 1024 * 1024


@dataclass(frozen=True)
class Update:
    """One adapter's update of one base tensor (see merge_core.inputs.adapter.KINDS)."""
    adapter: int  # index into the plan's adapter URIs
    data_start: int  # where the adapter file's tensor data begins
    kind: str
    factors: tuple[TensorInfo, ...]  # the adapter tensors it reads, in the order the fuse takes them
    roles: tuple[str, ...]
    scale: float  # the adapter's own scale (alpha/r), without its --weight
    weight: float = 1.0  # the adapter's --weight
    transpose: bool = False  # W stored in×out (fan_in_fan_out, embeddings): ΔW is transposed
    experts: tuple[int, ...] = ()  # param: see merge_core.inputs.adapter.ModuleUpdate


@dataclass(frozen=True)
class FuseTarget:
    tensor: str
    updates: tuple[Update, ...]
    # A tensor the base does not store (the output head of a model the merge unties) starts from
    # this base tensor of the same shard, and is written after the base's tensors.
    source: str | None = None
    shape: tuple[int, ...] | None = None  # the merged shape, where an adapter resized the tensor

    @property
    def base_tensor(self) -> str:
        return self.source or self.tensor


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
        factors = {(u.adapter, f.start, f.nbytes) for t in self.targets for u in t.updates for f in u.factors}
        return sum(nbytes for _, _, nbytes in factors)

    @property
    def read_bytes(self) -> int:
        """The shard, the adapter factors, and again the base tensors new tensors start from."""
        again = sum(self.shard.header.tensor(t.source).nbytes for t in self.targets if t.source is not None)
        return self.shard.size + self.adapter_bytes + again

    @property
    def output_tensors(self) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
        """The merged shard's (name, dtype, shape) in file order: the base's tensors, resized where
        an adapter resized them, then the tensors new to it."""
        targets = {t.tensor: t for t in self.targets}
        tensors = [(i.name, i.dtype, targets[i.name].shape if i.name in targets and targets[i.name].shape else i.shape)
                   for i in self.shard.header.tensors]
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
        the fixed part."""
        by_name = {name: (dtype, shape) for name, dtype, shape in self.output_tensors}
        largest = 0
        for target in self.targets:
            dtype, shape = by_name[target.tensor]
            compute = 8 if dtype == "F64" else 4
            per_element = compute * (2 if len(target.updates) > 1 else 1) + 2 * DTYPE_BYTES[dtype]
            resized_from = self.shard.header.tensor(target.base_tensor).nbytes if target.shape else 0
            largest = max(largest, per_element * math.prod(shape) + resized_from)
        return FIXED_WORKER_BYTES + largest


@dataclass(frozen=True)
class MergePlan:
    base_uri: str
    adapter_uris: tuple[str, ...]
    tasks: tuple[ShardTask, ...]
    sequential: bool = False  # round after each adapter, in order (PEFT's merge_and_unload), not once
    combine: CombineSpec | None = None  # --combine: TIES/DARE/magnitude pruning of the adapters' deltas
    # config.json keys the merge changes (vocab_size of a resized vocabulary, tie_word_embeddings)
    config_updates: Mapping[str, object] = field(default_factory=dict)
    # files taken from an adapter rather than the base: the tokenizer saved with the adapter that
    # resized the vocabulary (name → adapter URI); and the base's tokenizer files it replaces
    # as a whole, which the output leaves out
    file_sources: Mapping[str, str] = field(default_factory=dict)
    files_left_out: tuple[str, ...] = ()

    @property
    def model_changes(self) -> dict:
        """What the merged model has that the base's layout had not, for the manifest."""
        resized = {f.tensor: [list(t.shard.header.tensor(f.tensor).shape), list(f.shape)]
                   for t in self.tasks for f in t.targets if f.shape is not None and f.source is None}
        added = {f.tensor: f.source for t in self.tasks for f in t.targets if f.source is not None}
        return {"config": dict(self.config_updates), "resized_tensors": resized, "added_tensors": added,
                "files_from_adapters": dict(self.file_sources), "base_files_left_out": list(self.files_left_out)}

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
        return sum(t.shard.header.data_start + t.output_bytes for t in self.tasks)  # headers: about the base's


def _expected_shape(update: ModuleUpdate) -> tuple[int, ...] | None:
    """The shape of the base tensor an update fits, from its factors (None: checked by size)."""
    if update.kind in ("lora", "embedding", "dora", "conv"):
        a, b = update.factor("A"), update.factor("B")
        if len(a.shape) > 2:
            return (b.shape[0], a.shape[1], *a.shape[2:])
        shape = (b.shape[0], a.shape[1])
        return shape[::-1] if update.transpose else shape
    if update.kind == "param":
        a, b = update.factor("A"), update.factor("B")
        if len(update.experts) != 1 or update.experts[0] == 1:  # 2-D: a parameter, or an expert's share of one
            return (b.shape[0], a.shape[1])
        return (update.experts[0], *((a.shape[1], b.shape[0]) if update.transpose else (b.shape[0], a.shape[1])))
    if update.kind == "bias":
        return tuple(update.factors[0].shape)
    if update.kind == "replace":
        return tuple(update.factors[0].shape)
    return None


def _fits(update: ModuleUpdate, shape: tuple[int, ...]) -> bool:
    expected = _expected_shape(update)
    if expected is not None:
        return tuple(shape) == expected
    if update.kind == "ia3":
        vector = update.factors[0].numel
        if update.roles[0] == "bias":
            return math.prod(shape) == vector
        dims = (shape[1], shape[0]) if update.transpose else tuple(shape[:2])
        side = dims[1] if update.roles[0] == "in" else dims[0]
        return len(shape) >= 2 and vector == side
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


def _check_target(base: BaseCheckpoint, update: ModuleUpdate, subject: str, source: str | None,
                  shapes: dict[str, tuple[int, ...]]) -> None:
    """The update fits the tensor it targets (at its current shape, `shapes`: a resized
    vocabulary's); records the new shape when it resizes it."""
    name = source or update.target
    shard_name = base.weight_map.get(name)
    if shard_name is None:
        stored = " (neither whole nor one tensor per expert)" if update.kind == "param" else ""
        raise InputError(subject, f"targets {update.target}, which the base checkpoint does not have{stored}",
                         "check that the adapter was trained on this base model")
    info = base.shard(shard_name).header.tensor(name)
    if info.dtype not in FLOAT_DTYPES:
        raise InputError(f"{base.uri}/{shard_name}: tensor {name}", f"is {info.dtype}; an adapter can only "
                         f"be merged into {', '.join(FLOAT_DTYPES)}", "merge into an unquantized base checkpoint")
    shape = shapes.get(update.target, tuple(info.shape))
    if resizes(update, shape):
        shapes[update.target] = tuple(update.factors[0].shape)
    elif not _fits(update, shape):
        expected = _expected_shape(update)
        what = (f"is {list(shape)} in the base, the adapter's copy is {list(expected)}"
                if update.kind == "replace" else
                f"delta shape {list(expected) if expected else [f.shape for f in update.factors]} does not fit "
                f"{update.target} of shape {list(shape)}")
        raise InputError(subject, what, "check that the adapter was trained on this base model")


def _check_together(update: ModuleUpdate, subject: str, index: int, weight: float, uri: str,
                    earlier: Sequence[Update], combine: CombineSpec | None) -> None:
    """An update goes with its adapter's --weight, --combine, and the updates of the same tensor
    planned before it."""
    if combine is not None and update.kind not in ADDITIVE_KINDS:
        raise InputError(subject, f"updates {update.target} by {update.kind}, which --combine cannot prune "
                         "(it combines additive deltas)", "merge this adapter without --combine")
    if weight != 1 and update.kind not in ADDITIVE_KINDS:
        raise InputError(f"--weight {weight:g}", f"{uri} updates {update.target} by {update.kind}, "
                         "which is not a sum: it cannot be weighted", "give this adapter weight 1")
    if update.kind == "dora" and any(u.kind != "replace" for u in earlier):
        raise InputError(subject, f"applies DoRA to {update.target} after another adapter updated it: PEFT "
                         "then normalises by a weight it recovers by unmerging the others, which neither "
                         "its forward pass nor lora-merge does", "give the DoRA adapter first")
    copies = [u.adapter for u in earlier if u.kind == "replace"]
    if update.kind == "replace" and index in copies:
        raise InputError(subject, f"is a second whole copy of {update.target} in this adapter",
                         "re-save the adapter with PEFT")
    if update.kind == "replace" and copies:
        raise InputError(subject, f"a second adapter also replaces {update.target} with its own copy",
                         "merge adapters that save whole copies of a module one at a time")


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
    added: dict[str, str] = {}  # tensors new to the model → the base tensor each starts from
    shapes: dict[str, tuple[int, ...]] = {}  # resized tensors' new shapes
    tied = base.tied_embedding
    head_updates = []  # updates of a head tied to the embedding, which land on the embedding
    resizer = None  # the adapter that resizes the vocabulary
    for index, (adapter, weight) in enumerate(zip(adapters, weights)):
        where = f"{adapter.uri}/{ADAPTER_WEIGHTS_NAME}"
        # (as saved, where it lands, the base tensor a new tensor starts from)
        placed = [(u, *tied_target(base, u)) for saved in adapter.updates
                  for u in (expert_targets(base, saved, where) if saved.kind == "param" else [saved])]
        # One tensor saved twice by one adapter (a modules_to_save module's original beside its
        # trained copy; a tied head's copy beside the embedding's, the same shared tensor when
        # trained): the copy saved under the tensor's own name is the one merged.
        own_copies = {u.target for u, landed, _ in placed if u.kind == "replace" and u.saved_as != "original_module"
                      and landed.target == u.target}
        # PEFT merges modules in the model's order: a tied head's update lands after the embedding's.
        placed.sort(key=lambda p: p[1].target != p[0].target)
        for head, update, source in placed:
            subject = f"{where}: tensor {update.factors[0].name}"
            if update.kind == "ia3" and update.roles[0] == "bias" and head.target not in base.weight_map:
                continue  # IA3 scales the bias of output-side layers that have one
            if (update.kind == "replace" and update.target in own_copies
                    and (update.saved_as == "original_module" or update.target != head.target)):
                continue
            if update.target != head.target and update.saved_as != "original_module":
                head_updates.append(subject)
            if update.kind == "replace" and update.trained_copy and update.target == tied:
                added[UNTIED_HEAD] = tied  # a trained copy of the tied embedding: the head keeps the original
            if source is not None:
                added[update.target] = source
            if added and head_updates:  # the head's update would belong to the untied original
                raise InputError(head_updates[0], f"updates lm_head, which the base ties to {tied}, while a "
                                 "trained copy of one of them unties the two",
                                 "merge this adapter with PEFT's merge_and_unload")
            resized_before = update.target in shapes
            _check_target(base, update, subject, source, shapes)
            if update.target in shapes and not resized_before:
                if updates.get(update.target):
                    raise InputError(subject, f"resizes {update.target}, which an adapter before it updates at its "
                                     "old size", "give the adapter that resizes the vocabulary first")
                resizer = adapter
            _check_together(update, subject, index, weight, adapter.uri, updates.get(update.target, []), combine)
            updates.setdefault(update.target, []).append(Update(
                index, adapter.header.data_start, update.kind, update.factors, update.roles, update.scale, weight,
                update.transpose, update.experts))
    vocab_size = check_vocabulary(base, shapes, added) if shapes else None
    for name, tensor_updates in updates.items():
        if combine is not None and len({u.kind in ROUNDED_DELTA_KINDS for u in tensor_updates}) > 1:
            raise InputError(name, "is updated both by LoRA on its layer and by LoRA on it as a parameter, whose "
                             "deltas PEFT rounds differently: --combine cannot combine them",
                             "merge these adapters without --combine")

    tasks = []
    for shard in base.shards:
        names = [t.name for t in shard.header.tensors if t.name in updates]
        names += [name for name, source in added.items() if source in shard.header.names]
        targets = tuple(FuseTarget(name, tuple(updates.get(name, ())), added.get(name), shapes.get(name))
                        for name in names)
        unvalidated = UNVALIDATED_SINGLE_NAME if not base.indexed else shard.name
        tasks.append(ShardTask(shard, targets, unvalidated))
    tokenizer = resizer.tokenizer_files if resizer else ()
    return MergePlan(base.uri, tuple(a.uri for a in adapters), tuple(tasks), sequential, combine,
                     config_updates(base, vocab_size, bool(added)), {name: resizer.uri for name in tokenizer},
                     tuple(n for n in base.extra_files if tokenizer and n in TOKENIZER_FILES and n not in tokenizer))
