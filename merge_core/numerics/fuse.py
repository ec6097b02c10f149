"""The fuse: each base tensor W becomes the merged W', computed as PEFT computes it.

PEFT's merge_and_unload on a CPU works in float32: the adapter weights are float32 (PEFT upcasts
them on load), each ΔW is computed as merge_core.numerics.deltas says, and the in-place update of W
computes in float32 and rounds once to W's dtype. Keeping the same operations in the same order
is what makes the result bit-identical. Updates are applied in stages (see _stages), each
rounded as PEFT rounds it; the work runs over cache-sized blocks of rows in reused buffers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from merge_core.kinds import ExpertShare, Kind
from merge_core.numerics.deltas import delta_weight
from merge_core.numerics.stats import FuseStats
from merge_core.numerics.workspace import BLOCK_ELEMENTS, Workspace, exact_float32_matmul, workspace_for

IA3_UNMERGE_EPSILON = 1e-8  # PEFT's guard against dividing by a zero IA3 vector


@dataclass(frozen=True)
class Term:
    """One adapter's update of the tensor being fused, with its tensors loaded."""
    kind: Kind
    tensors: Mapping[str, torch.Tensor]  # by role: A, B, magnitude, l, tensor, w1_a, ...
    scale: float = 1.0
    transpose: bool = False
    side: str = ""  # ia3: which side the vector scales ("in", "out" or "bias")
    experts: ExpertShare | None = None  # param: the experts it covers


@dataclass
class _Stage:
    """Terms applied together to the running W, rounded to W's dtype after (as PEFT rounds
    after each in-place update of the weight). op: add, add_rounded (W + round(ΔW), as PEFT
    merges embeddings and parameters), dora, ia3, replace."""
    op: str
    terms: list[Term] = field(default_factory=list)
    data: torch.Tensor | None = None  # ΔW, the IA3 multiplier or the replacement, rows × rest
    magnitude: torch.Tensor | None = None
    # With several updates, for the report: ‖ΔW‖ of each term (a sum stage), or the stage's whole
    # change, ‖W after − W before‖ squared and summed over blocks (the others)
    norms: list[float] = field(default_factory=list)
    change_sq: float = 0.0


def _stages(terms: Sequence[Term], sequential: bool, combine: Callable | None, unmerge: bool = False
            ) -> list[_Stage]:
    """Replacements first (PEFT loads whole-tensor copies before it merges), then the updates in
    adapter order. Additive updates share one stage, so that W + ΣΔW is rounded once, unless
    `sequential` (PEFT's merge_and_unload of several adapters: one rounding after each). To
    unmerge, as PEFT's unmerge_adapter(): the last adapter first, each its own stage."""
    if unmerge:
        return [_Stage(t.kind.facts.unmerge, [t]) for t in reversed(terms)]
    stages = [_Stage("replace", [t]) for t in terms if t.kind is Kind.REPLACE]
    for term in (t for t in terms if t.kind is not Kind.REPLACE):
        op = term.kind.facts.stage
        joins = (stages and stages[-1].op == op and op in ("add", "add_rounded")
                 and (combine is not None or not sequential))
        if joins:
            stages[-1].terms.append(term)
        else:
            stages.append(_Stage(op, [term]))
    return stages


def _rows_of(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor seen as rows × rest: W is fused over blocks of rows."""
    return tensor.reshape(1, -1) if tensor.dim() < 2 else tensor.reshape(tensor.shape[0], -1)


def _prepare(stage: _Stage, index: int, weight: torch.Tensor, workspace: Workspace, compute: torch.dtype,
             combine: Callable | None, measure: bool = False) -> None:
    """The stage's data on the device: ΔW (summed over its terms), the IA3 multiplier or the copy.
    With `measure`, each term's ‖ΔW‖ too."""
    shape = tuple(weight.shape)

    def buffer(slot: str) -> Callable[[tuple[int, ...]], torch.Tensor]:
        return lambda s: workspace.buffer(slot, compute, weight.numel()).view(s)

    first = stage.terms[0]
    if stage.op == "replace":
        stage.data = _rows_of(first.tensors["tensor"].to(workspace.device))
    elif stage.op in ("ia3", "ia3_div"):
        vector = first.tensors["l"].to(workspace.device, compute)
        if stage.op == "ia3_div":  # PEFT's unmerge divides by l + 1e-8, the sum rounded first
            vector = vector + IA3_UNMERGE_EPSILON
        if first.side == "bias":
            multiplier = vector.reshape(shape)
        elif weight.dim() == 2:
            multiplier = vector.T if first.transpose else vector
        else:  # convolutions: (1, C_in, 1, …) on feedforward layers, (1, C_out, 1, …) transposed otherwise
            multiplier = (vector if first.side == "in" else vector.transpose(0, 1)).expand(shape)
        stage.data = multiplier.reshape(multiplier.shape[0], -1) if multiplier.dim() > 1 else multiplier.reshape(1, -1)
    else:
        def term_delta(term: Term, slot: str) -> torch.Tensor:
            tensors = {k: v.to(workspace.device, compute) for k, v in term.tensors.items() if k != "magnitude"}
            return delta_weight(term.kind, tensors, term.scale, term.transpose, shape, buffer(slot), term.experts)

        if combine is not None:  # even one adapter's ΔW is pruned, and weighted, by the combination
            delta = combine([term_delta(t, f"term{i}").contiguous() for i, t in enumerate(stage.terms)])
        else:
            delta = term_delta(first, f"delta{index}")
            stage.norms = [float(torch.linalg.vector_norm(delta))] if measure else []
            for term in stage.terms[1:]:
                term_delta_ = term_delta(term, "term")
                if measure:
                    stage.norms.append(float(torch.linalg.vector_norm(term_delta_)))
                delta.add_(term_delta_)
        stage.data = _rows_of(delta) if delta.dim() != 2 else delta
        if stage.op == "dora":
            stage.magnitude = first.tensors["magnitude"].to(workspace.device, compute).reshape(-1)


def _apply(stage: _Stage, x: torch.Tensor, rows: slice, weight: torch.Tensor) -> None:
    """One stage on a block of rows of the running W (float32, `x`), in place."""
    data = stage.data
    if stage.op == "replace":
        x.copy_(data[rows].to(x.dtype))
    elif stage.op == "ia3":
        x.mul_(data[rows] if data.shape[0] > 1 else data)
    elif stage.op == "ia3_div":
        x.div_(data[rows] if data.shape[0] > 1 else data)
    elif stage.op == "add":
        x.add_(data[rows])
    elif stage.op == "sub":
        x.sub_(data[rows])
    elif stage.op == "sub_rounded":  # PEFT's unmerge: W -= ΔW.to(W.dtype)
        x.sub_(data[rows].to(weight.dtype).to(x.dtype))
    elif stage.op == "add_rounded":  # PEFT's Embedding.merge: W += ΔW.to(W.dtype)
        x.add_(data[rows].to(weight.dtype).to(x.dtype))
    else:  # dora: W ← m / ‖W + ΔW‖ · (W + ΔW), the norm taken per output as PEFT takes it
        x.add_(data[rows])
        term = stage.terms[0]
        if term.transpose:  # stored in×out (embeddings, fan_in_fan_out): a norm per column, whole tensor
            x.mul_((stage.magnitude / torch.linalg.norm(x.T, dim=1)).view(1, -1))
        elif weight.dim() > 2:  # convolutions: the norm over all but the output channel
            full = x.view(x.shape[0], *weight.shape[1:])
            norm = full.norm(p=2, dim=tuple(range(1, weight.dim())), keepdim=True).reshape(-1)
            x.mul_((stage.magnitude[rows] / norm).view(-1, 1))
        else:
            x.mul_((stage.magnitude[rows] / torch.linalg.norm(x, dim=1)).view(-1, 1))


class _Tally:
    """‖W‖², ‖ΔW‖², max |ΔW| and the NaN/Inf W' gained, summed over blocks for the report."""

    def __init__(self) -> None:
        self.weight_sq = self.delta_sq = self.delta_max = 0.0
        self.introduced = 0

    def add(self, before: torch.Tensor, after: torch.Tensor, stored: torch.Tensor, limit: float) -> None:
        """`before`: the block of W (overwritten with -ΔW as applied); `after`: W' in float32;
        `stored`: where W' goes, in W's dtype."""
        self.weight_sq += float(torch.linalg.vector_norm(before)) ** 2
        low, high = torch.aminmax(after)
        finite = bool(torch.maximum(-low, high) <= limit)  # else NaN or Inf, or rounds past W's dtype
        before.sub_(after)
        low_d, high_d = torch.aminmax(before)
        self.delta_max = max(self.delta_max, float(torch.maximum(-low_d, high_d)))
        self.delta_sq += float(torch.linalg.vector_norm(before)) ** 2
        already = 0 if finite else int((~stored.isfinite()).sum())
        stored.copy_(after)
        if not finite:
            self.introduced += int((~stored.isfinite()).sum()) - already

    def add_sum(self, w: torch.Tensor, delta: torch.Tensor, x: torch.Tensor, limit: float) -> None:
        """W + ΔW (one sum stage) over a block, in fewer passes than add(): ΔW's numbers from ΔW
        itself, W' = W + ΔW computed in float32 in `x` and rounded into W."""
        x.copy_(w)
        flat = x.reshape(-1)
        self.weight_sq += float(torch.dot(flat, flat))
        x.add_(delta)
        low, high = torch.aminmax(x)
        finite = bool(torch.maximum(-low, high) <= limit)
        low_d, high_d = torch.aminmax(delta)
        self.delta_max = max(self.delta_max, float(torch.maximum(-low_d, high_d)))
        flat_d = delta.reshape(-1) if delta.is_contiguous() else None
        self.delta_sq += float(torch.dot(flat_d, flat_d)) if flat_d is not None else \
            float(torch.linalg.vector_norm(delta)) ** 2
        already = 0 if finite else int((~w.isfinite()).sum())
        w.copy_(x)
        if not finite:
            self.introduced += int((~w.isfinite()).sum()) - already

    def stats(self) -> FuseStats:
        return FuseStats(self.delta_sq ** 0.5, self.delta_max, self.weight_sq ** 0.5, max(self.introduced, 0))


def _fuse_rows(target: torch.Tensor, stages: Sequence[_Stage], weight: torch.Tensor, workspace: Workspace,
               compute: torch.dtype, whole: bool, tally: _Tally, measure: bool = False) -> None:
    """Every stage over `target` (W as rows × rest, on the workspace's device), a block of rows at a
    time, in float32 buffers reused between blocks; W' is written back over `target`."""
    rows, width = target.shape
    step = rows if whole else max(1, BLOCK_ELEMENTS // max(1, width))
    block = min(rows, step) * width
    x_all = workspace.buffer("block", compute, block)
    before_all = workspace.buffer("before", compute, block)
    rounded_all = workspace.buffer("rounded", weight.dtype, block)
    changes_all = workspace.buffer("change", compute, block) if measure else None
    limit = torch.finfo(weight.dtype).max
    if len(stages) == 1 and stages[0].op == "add":  # the common case, LoRA: W + ΣΔW in one sum
        for start in range(0, rows, step):
            w = target[start:start + step]
            tally.add_sum(w, stages[0].data[start:start + step], x_all[:w.numel()].view(w.shape), limit)
        return
    for start in range(0, rows, step):
        rows_here = slice(start, start + step)
        w = target[rows_here]
        x, before = x_all[:w.numel()].view(w.shape), before_all[:w.numel()].view(w.shape)
        rounded = rounded_all[:w.numel()].view(w.shape)
        before.copy_(w)
        x.copy_(before)
        for number, stage in enumerate(stages):
            if number:  # the previous stage's result, rounded as PEFT stores it in the weight
                rounded.copy_(x)
                x.copy_(rounded)
            measured = measure and not stage.norms
            if measured:
                change = changes_all[:w.numel()].view(w.shape)
                change.copy_(x)
            _apply(stage, x, rows_here, weight)
            if measured:
                stage.change_sq += float(torch.linalg.vector_norm(change.sub_(x))) ** 2
        tally.add(before, x, w, limit)


def fuse_into(weight: torch.Tensor, terms: Sequence[Term], workspace: Workspace,
              before_writing: Callable[[], object] | None = None, sequential: bool = False,
              combine: Callable[[list[torch.Tensor]], torch.Tensor] | None = None, unmerge: bool = False) -> FuseStats:
    """W ← the merged W, in place in `weight` (a CPU tensor over the bytes read, or a tensor already
    on the workspace's device, as a decoded quantized weight is).

    Each stage computes in float32 what PEFT computes, in the same order (the product, the scale,
    then the add: IEEE addition commutes, so W + ΔW has the bits of PEFT's W += ΔW), and rounds
    to W's dtype once at its end. A float64 base keeps float64 throughout, as PEFT casts the
    adapter to the base's dtype. Working set: ΔW per stage, plus cache-sized blocks on a CPU, or
    W on the GPU and its pinned staging buffer. `before_writing` is called once the deltas are
    ready and before W's bytes change (e.g. to let a hash of them finish). `combine` merges the
    full deltas of several adapters (--combine) into one. `unmerge` takes the terms back out as
    PEFT's unmerge_adapter() does (see merge_core.kinds).
    """
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    on_gpu = workspace.device.type == "cuda"
    stages = _stages(terms, sequential, combine, unmerge)
    measure = len(terms) > 1 and combine is None  # each adapter's ‖ΔW‖ for the report
    tally = _Tally()
    with exact_float32_matmul():
        for index, stage in enumerate(stages):
            _prepare(stage, index, weight, workspace, compute, combine, measure)
        if before_writing is not None:
            before_writing()
        # A DoRA norm per column (W stored in×out) needs every row at once, as does the GPU.
        whole = on_gpu or any(s.op == "dora" and s.terms[0].transpose for s in stages)
        if not on_gpu or weight.device == workspace.device:  # on the CPU, or already on the GPU
            _fuse_rows(_rows_of(weight), stages, weight, workspace, compute, whole, tally, measure)
        else:
            rows = _rows_of(weight)
            staged = workspace.buffer("host", weight.dtype, weight.numel(), pinned=True).view(rows.shape)
            staged.copy_(rows)
            target = workspace.buffer("weight", weight.dtype, weight.numel()).view(rows.shape)
            target.copy_(staged, non_blocking=True)
            _fuse_rows(target, stages, weight, workspace, compute, whole, tally, measure)
            staged.copy_(target, non_blocking=True)
            torch.cuda.current_stream(workspace.device).synchronize()
            rows.copy_(staged)
    stats = tally.stats()
    return dataclasses.replace(stats, adapter_norms=_term_norms(terms, stages)) if measure else stats


def _term_norms(terms: Sequence[Term], stages: Sequence[_Stage]) -> tuple[float, ...]:
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
