"""The fuse: each base tensor W becomes the merged W', computed as PEFT computes it.

PEFT's merge_and_unload on a CPU works in float32: the adapter weights are float32 (PEFT upcasts
them on load), each update is applied in place to a float32 view of W, and the result is rounded
once to W's dtype. The fuse does the same in stages (_stages): each applies its terms' ops
(merge_core.numerics.ops) to the running W and is rounded after, as PEFT rounds after each in-place
update. The work runs over cache-sized blocks of rows in reused buffers; a Tally measures it for
the report. For plain LoRA it is one stage, _sum_block: W' = round(W + ΔW), ΔW = B·A·s.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable, Sequence

import torch

from merge_core.numerics.arithmetic import Arithmetic
from merge_core.numerics.combine import combine_deltas
from merge_core.numerics.ops import Stage, Term
from merge_core.numerics.stats import FuseStats
from merge_core.numerics.tally import Tally
from merge_core.numerics.workspace import BLOCK_ELEMENTS, Workspace, exact_float32_matmul, workspace_for


def _stages(terms: Sequence[Term], arithmetic: Arithmetic) -> list[Stage]:
    """Copies first (PEFT loads whole-tensor copies before it merges), then the updates in adapter
    order. Sums share one stage, so that W + ΣΔW is rounded once, unless `sequential` (PEFT's
    merge_and_unload of several adapters: one rounding after each). To unmerge, as PEFT's
    unmerge_adapter(): the last adapter first, each its own stage."""
    if arithmetic.unmerge:
        return [Stage(t.op, [t], undo=True) for t in reversed(terms)]
    stages = [Stage(t.op, [t]) for t in terms if t.op.first]
    for term in (t for t in terms if not t.op.first):
        if stages and _sums_with(stages[-1], term, arithmetic):
            stages[-1].terms.append(term)
        else:
            stages.append(Stage(term.op, [term]))
    return stages


def _sums_with(stage: Stage, term: Term, arithmetic: Arithmetic) -> bool:
    """Whether `term` adds to `stage` before one rounding: both sums PEFT rounds alike."""
    ours, theirs = stage.terms[0].kind.facts, term.kind.facts
    return (ours.additive and theirs.additive and ours.rounds_delta == theirs.rounds_delta
            and not arithmetic.rounds_each)


def _rows_of(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor seen as rows × rest: W is fused over blocks of rows."""
    return tensor.reshape(1, -1) if tensor.dim() < 2 else tensor.reshape(tensor.shape[0], -1)


def _slot(workspace: Workspace, slot: str, dtype: torch.dtype, numel: int, shape: tuple[int, ...]) -> torch.Tensor:
    return workspace.buffer(slot, dtype, numel).view(shape)


def _operand(term: Term, slot: str, weight: torch.Tensor, workspace: Workspace, compute: torch.dtype) -> torch.Tensor:
    """A term's operand; an op that computes into a buffer takes the workspace's `slot`, reused between
    tensors."""
    return term.op.operand(term, weight.shape, partial(_slot, workspace, slot, compute, weight.numel()))


def _prepare(stage: Stage, index: int, weight: torch.Tensor, workspace: Workspace, compute: torch.dtype,
             arithmetic: Arithmetic, name: str, measure: bool) -> None:
    """The stage's operand on the device: ΔW summed over its terms (or combined, --combine), IA3's
    multiplier, or the copy. With `measure`, each term's ‖ΔW‖ too."""
    terms = [t.op.on_device(t, workspace.device, compute) for t in stage.terms]
    if arithmetic.combine is not None:  # even one adapter's ΔW is pruned, and weighted, by the combination
        deltas = [_operand(t, f"term{i}", weight, workspace, compute).contiguous() for i, t in enumerate(terms)]
        result = combine_deltas(deltas, [t.weight for t in terms], arithmetic.combine, name)
    else:
        result = _operand(terms[0], f"delta{index}", weight, workspace, compute)
        measured = measure and stage.op.is_delta
        stage.norms = [float(torch.linalg.vector_norm(result))] if measured else []
        for term in terms[1:]:
            delta = _operand(term, "term", weight, workspace, compute)
            if measured:
                stage.norms.append(float(torch.linalg.vector_norm(delta)))
            result.add_(delta)
    stage.loaded, stage.weight = terms, weight
    stage.operand = result if result.dim() == 2 else _rows_of(result)


def _round_into(w: torch.Tensor, x: torch.Tensor, tally: Tally) -> None:
    """W' = x rounded to W's dtype, written over W; the tally counts the NaN/Inf that brings."""
    already = tally.nonfinite_before(x, w)
    w.copy_(x)
    tally.nonfinite_after(w, already)


def _sum_block(w: torch.Tensor, stage: Stage, rows: slice, x: torch.Tensor, tally: Tally) -> None:
    """One sum on a block of W: W' = round(W + ΔW) (LoRA: ΔW = B·A·s), PEFT's W += ΔW in float32."""
    x.copy_(w)
    tally.weight(x)
    stage.apply(x, rows)  # W + ΔW
    tally.delta(stage.operand[rows])
    _round_into(w, x, tally)


class _Blocks:
    """The float32 buffers one block of rows is fused in, reused between blocks and tensors."""

    def __init__(self, workspace: Workspace, compute: torch.dtype, dtype: torch.dtype, numel: int, measure: bool):
        self.x = workspace.buffer("block", compute, numel)
        self.before = workspace.buffer("before", compute, numel)
        self.rounded = workspace.buffer("rounded", dtype, numel)
        self.change = workspace.buffer("change", compute, numel) if measure else None


def _staged_block(w: torch.Tensor, stages: Sequence[Stage], rows: slice, blocks: _Blocks, tally: Tally,
                  measure: bool) -> None:
    """Every stage on a block of W, each rounded as PEFT stores it in the weight before the next."""
    x, before = blocks.x[:w.numel()].view(w.shape), blocks.before[:w.numel()].view(w.shape)
    before.copy_(w)
    x.copy_(before)
    for number, stage in enumerate(stages):
        if number:  # the stage before, rounded to W's dtype
            rounded = blocks.rounded[:w.numel()].view(w.shape)
            rounded.copy_(x)
            x.copy_(rounded)
        measured = measure and not stage.norms
        if measured:
            change = blocks.change[:w.numel()].view(w.shape)
            change.copy_(x)
        stage.apply(x, rows)
        if measured:
            stage.change_sq += float(torch.linalg.vector_norm(change.sub_(x))) ** 2
    tally.change(before, x)
    _round_into(w, x, tally)


def _over_blocks(target: torch.Tensor, stages: Sequence[Stage], workspace: Workspace, compute: torch.dtype,
                 whole: bool, tally: Tally, measure: bool) -> None:
    """Every stage over `target` (W as rows × rest, where the workspace computes), a block of rows at a
    time; W' is written back over it."""
    rows, width = target.shape
    step = rows if whole else max(1, BLOCK_ELEMENTS // max(1, width))
    numel = min(rows, step) * width
    if len(stages) == 1 and stages[0].plain_sum:  # the common case, LoRA: W + ΣΔW in one pass
        x_all = workspace.buffer("block", compute, numel)
        for start in range(0, rows, step):
            w = target[start:start + step]
            _sum_block(w, stages[0], slice(start, start + step), x_all[:w.numel()].view(w.shape), tally)
        return
    blocks = _Blocks(workspace, compute, target.dtype, numel, measure)
    for start in range(0, rows, step):
        _staged_block(target[start:start + step], stages, slice(start, start + step), blocks, tally, measure)


def fuse_into(weight: torch.Tensor, terms: Sequence[Term], workspace: Workspace,
              arithmetic: Arithmetic = Arithmetic(), *, name: str = "",
              before_writing: Callable[[], object] | None = None) -> FuseStats:
    """W ← the merged W (or, with arithmetic.unmerge, the adapters taken back out), in place in
    `weight`: a CPU tensor over the bytes read, or a tensor already on the workspace's device, as a
    decoded quantized weight is.

    A float64 base keeps float64 throughout, as PEFT casts the adapter to the base's dtype. Working
    set: each stage's operand, plus cache-sized blocks on a CPU, or W on the GPU and its pinned
    staging buffer. `name` (the tensor's) seeds the random masks of a DARE combination.
    `before_writing` is called once the operands are ready and before W's bytes change (e.g. to let
    a hash of them finish)."""
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    stages = _stages(terms, arithmetic)
    measure = len(terms) > 1 and arithmetic.combine is None  # each adapter's ‖ΔW‖ for the report
    tally = Tally(weight.dtype)
    with exact_float32_matmul():
        for index, stage in enumerate(stages):
            _prepare(stage, index, weight, workspace, compute, arithmetic, name, measure)
        if before_writing is not None:
            before_writing()
        # The GPU takes every row at once, as does a DoRA norm per column (W stored in×out).
        whole = workspace.device.type == "cuda" or any(s.op.needs_every_row(s) for s in stages)
        with workspace.holding(_rows_of(weight)) as target:
            _over_blocks(target, stages, workspace, compute, whole, tally, measure)
    stats = tally.stats()
    return dataclasses.replace(stats, adapter_norms=_term_norms(terms, stages)) if measure else stats


def _term_norms(terms: Sequence[Term], stages: Sequence[Stage]) -> tuple[float, ...]:
    """Each term's ‖ΔW‖ in the order the terms were given (the updates' order)."""
    norms = {}
    for stage in stages:
        if stage.norms:
            norms.update({id(t): n for t, n in zip(stage.terms, stage.norms)})
        else:
            norms[id(stage.terms[0])] = stage.change_sq ** 0.5
    return tuple(norms[id(t)] for t in terms)


def fuse(weight: torch.Tensor, terms: Sequence[Term], workspace: Workspace | None = None, **options
         ) -> tuple[torch.Tensor, FuseStats]:
    """fuse_into() on a copy: (W', stats), W untouched."""
    merged = weight.clone()
    return merged, fuse_into(merged, terms, workspace or workspace_for("cpu"), **options)
