"""The planner: a pure function from checkpoint and adapter descriptions to the merge plan.

Everything that can be wrong with the inputs' shapes is found here, before any task runs or
any byte is written: a task only ever meets I/O failures.

    plan_merge(base, [adapter], [1.0])   # base: 3 shards; adapter: LoRA on q_proj/v_proj
    → MergePlan(tasks=(ShardTask(shard 1, targets=(FuseTarget("model.layers.0.self_attn.q_proj.weight",
                        updates=(Update(adapter=0, kind=lora, scale=2.0, ...),)), ...)), ...))

Each adapter update is placed where it lands (an expert's own tensor, a tied embedding), checked
against the tensor it fits and the updates placed on that tensor before it, then grouped by
shard in the base's file order.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

from merge_core.errors import InputError
from merge_core.format.codecs import FORMATS, UNCODED_FIX, codec_of, format_of, tensor_level
from merge_core.format.header import FLOAT_DTYPES
from merge_core.inputs.adapter import LoraAdapter, ModuleUpdate
from merge_core.inputs.checkpoint import BaseCheckpoint
from merge_core.names import ADAPTER_WEIGHTS_NAME, TOKENIZER_FILES, UNVALIDATED_SINGLE_NAME
from merge_core.numerics.arithmetic import Arithmetic, Combination
from merge_core.planning.experts import expert_targets
from merge_core.planning.model_config import config_updates
from merge_core.planning.plan import FuseTarget, MergePlan, ShardTask, StoredPart, Update
from merge_core.planning.shapes import expected_shape, fits
from merge_core.planning.siblings import sibling_groups
from merge_core.planning.vocabulary import UNTIED_HEAD, check_vocabulary, resizes, tied_target

log = logging.getLogger("lora_merge")
SCALES = ("keep", "fresh")  # --scales: the base's scales kept (the default), or fresh ones from W'


def _check_adapters(adapters: Sequence[LoraAdapter], weights: Sequence[float], allow_base_mismatch: bool) -> None:
    """The adapters agree with each other, and with their weights."""
    if not allow_base_mismatch:  # by base_model_name_or_path, where both say
        named = [(a.uri, a.config.get("base_model_name_or_path")) for a in adapters]
        named = [(uri, name) for uri, name in named if name]
        for uri, name in named[1:]:
            if name != named[0][1]:
                raise InputError(uri, f"was trained on {name!r}, but {named[0][0]} on {named[0][1]!r}",
                                 "merge adapters of one base, or pass --allow-base-mismatch if the bases are the "
                                 "same weights under other names")
    if len(weights) != len(adapters):
        raise InputError("--weight", f"{len(weights)} weight(s) for {len(adapters)} adapter(s)",
                         "give one --weight per --adapter, or none")
    if not all(math.isfinite(w) for w in weights):
        raise InputError("--weight", f"weights {list(weights)} are not all finite numbers", "give finite weights")


def _check_target(base: BaseCheckpoint, update: ModuleUpdate, subject: str, source: str | None,
                  shapes: dict[str, tuple[int, ...]]) -> None:
    """The update fits the tensor it targets (at its current shape, `shapes`: a resized
    vocabulary's); records the new shape when it resizes it."""
    name = source or update.target
    _check_uncoded(base, name, subject)
    if not base.has(name):
        stored = " (neither whole nor one tensor per expert)" if update.kind.facts.per_parameter else ""
        raise InputError(subject, f"targets {update.target}, which the base checkpoint does not have{stored}",
                         "check that the adapter was trained on this base model")
    quantized = base.quantized.get(name)
    owner = base.part_of(name)
    if owner is not None and quantized is None:
        codec_of(owner).meet(owner, name, resizes=False, subject=subject)
    info = base.info(name)
    if quantized is None and info.dtype not in FLOAT_DTYPES:
        raise InputError(f"{base.uri}/{base.shard_of(name)}: tensor {name}", f"is {info.dtype}; an adapter can only "
                         f"be merged into {', '.join(FLOAT_DTYPES)} or a supported quantized format "
                         f"({', '.join(FORMATS)})", "merge into an unquantized base checkpoint")
    shape = shapes.get(update.target, tuple(info.shape))
    if resizes(update, shape):
        if quantized is not None:
            codec_of(quantized).meet(quantized, name, resizes=True, subject=subject)
        shapes[update.target] = tuple(update.factors[0].shape)
    elif not fits(update, shape):
        expected = expected_shape(update)
        what = (f"is {list(shape)} in the base, the adapter's copy is {list(expected)}"
                if update.kind.facts.whole else
                f"delta shape {list(expected) if expected else [f.shape for f in update.factors]} does not fit "
                f"{update.target} of shape {list(shape)}")
        raise InputError(subject, what, "check that the adapter was trained on this base model")


def _check_uncoded(base: BaseCheckpoint, name: str, subject: str) -> None:
    """An update of a weight a quantized base stores in a format without a codec (GPTQ's qweight,
    bitsandbytes' packed bytes, an F8 ModelOpt weight, compressed-tensors' mxfp6) is refused, naming the
    tensor and its format; the base's other tensors merge as usual."""
    if base.quantization is None or name in base.quantized or base.part_of(name) is not None:
        return
    module = name.rsplit(".", 1)[0]
    beside = [n for n in base.stored_under(module) if n != name]
    stored = base.weight_map.get(name)
    quantized = (stored is not None and base.info(name).dtype not in FLOAT_DTYPES) or (stored is None and beside)
    if quantized:
        fmt = format_of(base.quantization, module)
        shown = [name] if stored is not None else beside[:4] + (["..."] if len(beside) > 4 else [])
        raise InputError(subject, f"targets {name}, which the base stores quantized by {fmt} "
                         f"({', '.join(shown)}), a format lora-merge has no codec for", UNCODED_FIX)


def _check_unmergeable(update: ModuleUpdate, subject: str) -> None:
    """What PEFT's unmerge_adapter() cannot take back out of a merged weight is refused by name."""
    if update.kind.facts.reversible:
        return
    raise InputError(subject, f"cannot be unmerged from {update.target}: {update.kind.facts.irreversible}",
                     "give the original base with --base to restore it from there")


def _check_together(update: ModuleUpdate, subject: str, index: int, weight: float, uri: str,
                    earlier: Sequence[Update], combine: Combination | None) -> None:
    """An update goes with its adapter's --weight, --combine, and the updates of the same tensor
    planned before it."""
    if combine is not None and not update.kind.additive:
        raise InputError(subject, f"updates {update.target} by {update.kind}, which --combine cannot prune "
                         "(it combines additive deltas)", "merge this adapter without --combine")
    if weight != 1 and not update.kind.additive:
        raise InputError(f"--weight {weight:g}", f"{uri} updates {update.target} by {update.kind}, "
                         "which is not a sum: it cannot be weighted", "give this adapter weight 1")
    if update.kind.facts.normalises and any(not u.kind.facts.whole for u in earlier):
        raise InputError(subject, f"applies DoRA to {update.target} after another adapter updated it: PEFT "
                         "then normalises by a weight it recovers by unmerging the others, which neither "
                         "its forward pass nor lora-merge does", "give the DoRA adapter first")
    copies = [u.adapter for u in earlier if u.kind.facts.whole]
    if update.kind.facts.whole and index in copies:
        raise InputError(subject, f"is a second whole copy of {update.target} in this adapter",
                         "re-save the adapter with PEFT")
    if update.kind.facts.whole and copies:
        raise InputError(subject, f"a second adapter also replaces {update.target} with its own copy",
                         "merge adapters that save whole copies of a module one at a time")


@dataclass(kw_only=True)
class _Placement:
    """The updates placed so far, by the tensor each lands on, and what they change in the model."""
    base: BaseCheckpoint
    arithmetic: Arithmetic
    restorable: bool = False  # unmerge with the original base given: what cannot be undone is copied back
    restored: set[str] = field(default_factory=set)
    updates: dict[str, list[Update]] = field(default_factory=dict)
    added: dict[str, str] = field(default_factory=dict)  # tensors new to the model → the base tensor each starts from
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # resized tensors' new shapes
    head_updates: list[str] = field(default_factory=list)  # updates of a tied head, landing on the embedding
    resizer: LoraAdapter | None = None  # the adapter that resizes the vocabulary

    def landings(self, adapter: LoraAdapter, where: str) -> list[tuple[ModuleUpdate, ModuleUpdate, str | None]]:
        """(as saved, where it lands, the base tensor a new tensor starts from) for each update that
        is merged, in the order PEFT merges them."""
        placed = [(u, *tied_target(self.base, u)) for saved in adapter.updates
                  for u in (expert_targets(self.base, saved, where) if saved.kind.facts.per_parameter else [saved])]
        # One tensor saved twice by one adapter (a modules_to_save module's original beside its
        # trained copy; a tied head's copy beside the embedding's, the same shared tensor when
        # trained): the copy saved under the tensor's own name is the one merged.
        own_copies = {u.target for u, landed, _ in placed if u.kind.facts.whole
                      and u.saved_as != "original_module" and landed.target == u.target}
        # PEFT merges modules in the model's order: a tied head's update lands after the embedding's.
        placed.sort(key=lambda p: p[1].target != p[0].target)
        return [(head, update, source) for head, update, source in placed
                if not (update.side == "bias" and not self.base.has(head.target))
                and not (update.kind.facts.whole and update.target in own_copies
                         and (update.saved_as == "original_module" or update.target != head.target))]

    def place(self, adapter: LoraAdapter, index: int, weight: float) -> None:
        where = f"{adapter.uri}/{ADAPTER_WEIGHTS_NAME}"
        tied = self.base.tied_embedding
        for head, update, source in self.landings(adapter, where):
            subject = f"{where}: tensor {update.factors[0].name}"
            if update.target != head.target and update.saved_as != "original_module":
                self.head_updates.append(subject)
            if update.kind.facts.whole and update.trained_copy and update.target == tied:
                self.added[UNTIED_HEAD] = tied  # a trained copy of the tied embedding: the head keeps the original
            if source is not None:
                self.added[update.target] = source
            if self.added and self.head_updates:  # the head's update would belong to the untied original
                raise InputError(self.head_updates[0], f"updates lm_head, which the base ties to {tied}, while a "
                                 "trained copy of one of them unties the two",
                                 "merge this adapter with PEFT's merge_and_unload")
            resized_before = update.target in self.shapes
            _check_target(self.base, update, subject, source, self.shapes)
            earlier = self.updates.setdefault(update.target, [])
            if update.target in self.shapes and not resized_before:
                if earlier:
                    raise InputError(subject, f"resizes {update.target}, which an adapter before it updates at its "
                                     "old size", "give the adapter that resizes the vocabulary first")
                self.resizer = adapter
            if self.arithmetic.unmerge and not update.kind.facts.reversible and self.restorable:
                self.restored.add(update.target)
                continue
            if self.arithmetic.unmerge:
                _check_unmergeable(update, subject)
            _check_together(update, subject, index, weight, adapter.uri, earlier, self.arithmetic.combine)
            earlier.append(Update(adapter=index, data_start=adapter.header.data_start, kind=update.kind,
                                  factors=update.factors, roles=update.roles, scale=update.scale, weight=weight,
                                  transpose=update.transpose, experts=update.experts, side=update.side))

    def check_combined(self) -> None:
        for name, tensor_updates in self.updates.items():
            if self.arithmetic.combine is not None and len({u.kind.rounds_delta for u in tensor_updates}) > 1:
                raise InputError(name, "is updated both by LoRA on its layer and by LoRA on it as a parameter, "
                                 "whose deltas PEFT rounds differently: --combine cannot combine them",
                                 "merge these adapters without --combine")

    def quantized_target(self, name: str, dequantize: bool, keep: bool) -> FuseTarget:
        """A quantized weight with its updates and its parts, wherever they are stored."""
        base, weight = self.base, self.base.quantized[name]
        parts = tuple(StoredPart(role, base.weight_map[info.name],
                                 base.shard(base.weight_map[info.name]).header.data_start, info)
                      for role, info in sorted(weight.parts, key=lambda p: p[1].name != weight.primary.name))
        return FuseTarget(tensor=name, updates=tuple(self.updates.get(name, ())), quantized=weight, parts=parts,
                          dequantize=dequantize, keep_scales=keep)

    def quantized_targets(self, dequantize: bool, keep: bool) -> dict[str, FuseTarget]:
        """The quantized weights the merge re-encodes (those an adapter updates; every one with
        --dequantize). With fresh scales, fused siblings that may share a tensor-level scale are merged
        together: the target of the first one the adapters touch carries the others."""
        targets = {name: self.quantized_target(name, dequantize, keep) for name in self.base.quantized
                   if name in self.updates or dequantize}
        if dequantize or keep:
            return targets
        for group in sibling_groups(self.base.quantized):
            weights = [self.base.quantized[n] for n in group]
            touched = [n for n in group if n in self.updates]
            if not touched or not all(tensor_level(w) for w in weights) or \
                    len({(w.codec, w.args, w.shape[1:]) for w in weights}) != 1:
                continue
            siblings = tuple(targets.pop(n, None) or self.quantized_target(n, dequantize, keep)
                             for n in group if n != touched[0])
            targets[touched[0]] = dataclasses.replace(targets[touched[0]], siblings=siblings)
        return targets

    def target(self, name: str) -> FuseTarget:
        """A tensor stored plainly, with its updates; an unmerge that cannot compute it restores it."""
        restore = name in self.restored
        return FuseTarget(tensor=name, updates=() if restore else tuple(self.updates.get(name, ())),
                          source=self.added.get(name), shape=self.shapes.get(name), restore=restore)

    def tasks(self, dequantize: bool, keep: bool) -> tuple[ShardTask, ...]:
        """One task per base shard, its targets in the shard's file order (a quantized weight where its
        codes are, its siblings' after it), new tensors last."""
        quantized = self.quantized_targets(dequantize, keep)
        moved = {p.info.name for t in quantized.values() for p in t.stored_parts[1:]}
        tasks = []
        for shard in self.base.shards:
            names = [t.name for t in shard.header.tensors if t.name in self.updates and t.name not in quantized
                     and t.name not in self.base.quantized]
            names += [name for name, source in self.added.items() if source in shard.header.names]
            names += [t.name for t in shard.header.tensors if t.name in self.restored and t.name not in names]
            targets = [self.target(name) for name in names]
            targets += [t for t in quantized.values() if t.parts[0].shard == shard.name]
            order = {name: i for i, name in enumerate(shard.header.names)}
            targets.sort(key=lambda t: (t.source is not None, order.get(t.parts[0].info.name if t.parts else t.tensor, 0)))
            tasks.append(ShardTask(shard, tuple(targets), shard.name if self.base.indexed else UNVALIDATED_SINGLE_NAME,
                                   tuple(n for n in shard.header.names if n in moved)))
        return tuple(tasks)


def plan_merge(base: BaseCheckpoint, adapters: Sequence[LoraAdapter], weights: Sequence[float],
               arithmetic: Arithmetic = Arithmetic(), *, allow_base_mismatch: bool = False, dequantize: bool = False,
               restorable: bool = False, scales: str = "keep") -> MergePlan:
    """One task per base shard, each listing the updates for the tensors it holds. With `dequantize`,
    a quantized base's weights are all written as bf16; otherwise `scales` says how a quantized weight
    an adapter updates is requantized: "fresh" scales, or "keep" the base's. With `arithmetic.unmerge`,
    `base` is a merged model and the adapters' updates are taken back out of it; with `restorable` (the
    original base is at hand), what cannot be taken out is restored from it whole."""
    arithmetic.check()
    _check_adapters(adapters, weights, allow_base_mismatch)
    placement = _Placement(base=base, arithmetic=arithmetic, restorable=restorable)
    for index, (adapter, weight) in enumerate(zip(adapters, weights)):
        placement.place(adapter, index, weight)
    placement.updates = {name: updates for name, updates in placement.updates.items() if updates}
    vocab_size = check_vocabulary(base, placement.shapes, placement.added) if placement.shapes else None
    placement.check_combined()
    resizer = placement.resizer
    tokenizer = resizer.tokenizer_files if resizer else ()
    if dequantize and base.quantization is None:
        log.warning("--dequantize: %s is not quantized; its weights are written as they are", base.uri)
    dequantizing = dequantize and base.quantization is not None
    if dequantizing and base.quantization.uncoded:
        raise InputError(f"{base.uri}/config.json: quantization_config", f"--dequantize: lora-merge has no codec for "
                         f"{', '.join(base.quantization.uncoded)}, so its weights cannot be written as bf16",
                         "merge without --dequantize: those tensors are then copied as they are")
    if scales not in SCALES:
        raise InputError("--scales", f"{scales!r} is not one of {', '.join(SCALES)}", "give --scales fresh or keep")
    updates, removed = config_updates(base, vocab_size, bool(placement.added), dequantizing)
    return MergePlan(base_uri=base.uri, adapter_uris=tuple(a.uri for a in adapters),
                     tasks=placement.tasks(dequantizing, scales == "keep"), arithmetic=arithmetic,
                     config_updates=updates, scales=scales,
                     file_sources={name: resizer.uri for name in tokenizer},
                     files_left_out=tuple(n for n in base.extra_files
                                          if tokenizer and n in TOKENIZER_FILES and n not in tokenizer
                                          or dequantizing and n in base.quantization.config_files),
                     config_removed=removed)
