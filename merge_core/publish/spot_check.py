"""The final task's numeric spot check: sampled rows of fused tensors recomputed in float64, from
the base and adapter bytes, and compared with what was stored.

Deliberately not the fuse (merge_core.numerics.fuse) run again: an independent evaluation of
W + Σ s·(B·A) in float64, with a bound on how far a correct float32 evaluation may stray.
"""

from __future__ import annotations

import dataclasses
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Mapping, Sequence

import torch

from merge_core.format import codecs
from merge_core.format.header import ShardHeader, TensorInfo
from merge_core.format.tensors import TORCH_DTYPES, tensor_from_bytes
from merge_core.io.storage import Storage
from merge_core.kinds import Kind
from merge_core.names import ADAPTER_WEIGHTS_NAME
from merge_core.numerics.arithmetic import Arithmetic
from merge_core.numerics.ulps import ulp_distance
from merge_core.planning.plan import FuseTarget, MergePlan, ShardTask, Update

SPOT_TENSORS = 8
SPOT_ROWS = 4
# A quantized weight is read whole to check a few rows (and decoded whole where its format's parts do
# not come apart by rows): at most this many of the sampled tensors are quantized ones.
SPOT_QUANTIZED = 2
SPOT_READERS = 8


@dataclass(frozen=True)
class _Sources:
    """What the spot check reads: the base, the adapters, and the merged shard with its header."""
    base: Storage
    adapters: Sequence[Storage]
    output: Storage
    header: ShardHeader


def _row(storage: Storage, name: str, data_start: int, info: TensorInfo, row: int) -> torch.Tensor:
    row_bytes = info.nbytes // info.shape[0]
    raw = storage.read_range(name, data_start + info.start + row * row_bytes, row_bytes)
    return tensor_from_bytes(raw, info.dtype, info.shape[1:])


def _expected(target: FuseTarget, row: int, weight: torch.Tensor, adapters: Sequence[Storage],
              unmerge: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row `row` of the merge (or unmerge) in float64 from W's row: (exact, Σ|terms| bound for the
    float32 evaluation error, |ΔW| of the updates PEFT rounds before adding or subtracting)."""
    sign = -1.0 if unmerge else 1.0
    exact, bound = weight.clone(), weight.abs()
    rounded_delta = torch.zeros_like(exact)
    for u in target.updates:
        adapter = adapters[u.adapter]
        scale = u.scale * u.weight
        if u.kind is Kind.BIAS:  # element `row` of lora_B's bias, scaled
            b_elem = _row(adapter, ADAPTER_WEIGHTS_NAME, u.data_start, u.factors[0], row).double()
            exact += sign * b_elem * scale
            bound += b_elem.abs() * abs(scale)
            continue
        a_info, b_info = u.factors[u.roles.index("A")], u.factors[u.roles.index("B")]
        a = tensor_from_bytes(adapter.read_range(ADAPTER_WEIGHTS_NAME, u.data_start + a_info.start, a_info.nbytes),
                              a_info.dtype, a_info.shape).double()
        if u.transpose:  # row `row` of (B @ A)ᵀ is B @ A[:, row]
            b = tensor_from_bytes(adapter.read_range(ADAPTER_WEIGHTS_NAME, u.data_start + b_info.start, b_info.nbytes),
                                  b_info.dtype, b_info.shape).double()
            left, right = a[:, row], b.T
        else:
            left, right = _row(adapter, ADAPTER_WEIGHTS_NAME, u.data_start, b_info, row).double(), a
            if u.experts is not None and u.experts.index is not None:  # one expert's share: its r
                left = left.reshape(-1, u.experts.count)[:, u.experts.index]  # columns of the row's (r, E) layout
        term = (left @ right) * scale
        exact += sign * term
        bound += (left.abs() @ right.abs()) * abs(scale)
        if u.kind.rounds_delta or (unmerge and u.kind.facts.rounds_delta_out):
            rounded_delta += term.abs()
    return exact, bound, rounded_delta


def _evaluation_error(target: FuseTarget, bound: torch.Tensor) -> torch.Tensor:
    """How far a correct float32 evaluation of W + Σ scale·(B·A) may stray: a rank-r sum errs by about
    r·eps32·Σ|terms|, which matters where W and ΔW nearly cancel."""
    rank = max(u.factors[0].shape[0] if u.kind.facts.low_rank else 1 for u in target.updates)
    return 4 * (rank + 2) * torch.finfo(torch.float32).eps * bound


def _spot_row(task: ShardTask, target: FuseTarget, row: int, sources: _Sources, arithmetic: Arithmetic,
              weight: torch.Tensor | None = None) -> str | None:
    """One row of a tensor stored in a float dtype (`weight`: W's row when the caller decoded it)."""
    if weight is None:
        weight = _row(sources.base, task.name, task.shard.header.data_start,
                      task.shard.header.tensor(target.tensor), row)
    exact, bound, rounded_delta = _expected(target, row, weight.double(), sources.adapters, arithmetic.unmerge)
    stored_info = sources.header.tensor(target.tensor)
    stored = _row(sources.output, task.output_name, sources.header.data_start, stored_info, row)
    ulps = ulp_distance(stored, exact.to(TORCH_DTYPES[stored_info.dtype]))
    # Rounding adds up to one unit of the stored value to the float32 evaluation's error; LoRA on
    # parameters rounds ΔW first, which may move it by half a unit of ΔW itself.
    finfo = torch.finfo(stored.dtype)
    magnitude = stored.double().abs()
    unit = torch.where(magnitude > 0, 2.0 ** torch.floor(torch.log2(magnitude.clamp_min(finfo.tiny))) * finfo.eps,
                       torch.full_like(magnitude, finfo.tiny))
    allowed = unit + _evaluation_error(target, bound) + finfo.eps * rounded_delta
    if arithmetic.rounds_each:  # each adapter's result rounded, by up to half a unit of that value
        allowed += (len(target.updates) - 1) * finfo.eps * bound
    bad = (ulps > len(target.updates)) & ~((stored.double() - exact).abs() <= len(target.updates) * allowed)
    if bool(bad.any()):
        return (f"{sources.output.describe(task.output_name)}: tensor {target.tensor} row {row}: {int(bad.sum())} "
                f"elements differ from the float64 recomputation by up to {int(ulps.max())} ulp")
    return None


def _parts(storage: Storage, name: str, data_start: int, infos: Sequence[tuple[str, TensorInfo]]) -> dict:
    return {role: tensor_from_bytes(storage.read_range(name, data_start + i.start, i.nbytes), i.dtype, i.shape)
            for role, i in infos}


def _spot_quantized(task: ShardTask, target: FuseTarget, rows: Sequence[int], sources: _Sources,
                    arithmetic: Arithmetic = Arithmetic()) -> list[str]:
    """Rows of a quantized weight: the float64 merge of its decoded base rows, against the stored weight
    decoded (within one quantization step of its format, or at the end of its range where kept scales
    saturate it), or the stored bf16 (--dequantize)."""
    base, output, header = sources.base, sources.output, sources.header
    sampled, parts, at = codecs.rows(target.quantized, {p.role: tensor_from_bytes(
        base.read_range(p.shard, p.data_start + p.info.start, p.info.nbytes), p.info.dtype, p.info.shape)
        for p in target.parts}, rows)  # only the sampled rows are decoded, where the format allows
    weight = codecs.decode(sampled, parts)
    if target.dequantize:  # fused as float32 and rounded once: --sequential rounded to float32 in between
        once = dataclasses.replace(arithmetic, sequential=False)
        return [p for i, row in enumerate(rows)
                if (p := _spot_row(task, target, row, sources, once, weight=weight[at[i]]))]
    sampled, stored_parts, stored_at = codecs.rows(target.quantized, _parts(
        output, task.output_name, header.data_start, [(p.role, header.tensor(p.info.name)) for p in target.parts]),
        rows)
    stored, steps = codecs.decode(sampled, stored_parts), codecs.step(sampled, stored_parts)
    low, high = codecs.reach(sampled, stored_parts)
    problems = []
    for i, row in enumerate(rows):
        exact, bound, _ = _expected(target, row, weight[at[i]].double(), sources.adapters, arithmetic.unmerge)
        here = stored_at[i]
        value = stored[here].double()
        off = (value - exact).abs() - steps[here].double() - _evaluation_error(target, bound)
        saturated = ((exact >= high[here].double()) & (value == high[here].double())) | \
                    ((exact <= low[here].double()) & (value == low[here].double()))
        bad = (off > 0) & ~saturated
        if bool(bad.any()):
            problems.append(f"{output.describe(task.output_name)}: tensor {target.tensor} row {row}: "
                            f"{int(bad.sum())} elements lie more than one {target.quantized.codec} step from "
                            f"the float64 merge of the decoded base")
    return problems


def _row_recomputable(update: Update) -> bool:
    """Updates whose row the spot check recomputes: lora_bias, and the low-rank products of 2-D
    factors (LoRA on linear layers, on 2-D parameters or on one expert's tensor)."""
    if update.kind is Kind.BIAS:
        return True
    return (update.kind.facts.low_rank and len(update.factors[0].shape) == 2
            and (update.experts is None or update.experts.two_d))


def spot_check(plan: MergePlan, base: Storage, adapters: Sequence[Storage], output: Storage,
               headers: Mapping[str, ShardHeader], seed: int = 0) -> list[str]:
    """Recompute sampled rows of sampled fused tensors in float64 and compare with what was stored.
    Tensors updated by LoRA on linear layers, lora_bias and LoRA on 2-D parameters or experts
    stored one by one are sampled: the other kinds are
    checked against a fresh merge by `lora-merge verify`, and so are merges with --combine, whose
    pruning the float64 row recomputation does not repeat."""
    if plan.arithmetic.combine is not None:
        return []
    rng = random.Random(seed)
    fused = [(t, m) for t in plan.tasks for f in t.targets for m in f.members if t.name in headers and m.updates
             and all(_row_recomputable(u) for u in m.updates)
             and (m.quantized is None or len(m.quantized.shape) == 2)]
    checks, quantized = [], 0
    for task, target in rng.sample(fused, min(SPOT_TENSORS, len(fused))):
        sources = _Sources(base, adapters, output, headers[task.name])
        count = (target.quantized.shape if target.quantized else task.shard.header.tensor(target.tensor).shape)[0]
        rows = rng.sample(range(count), min(SPOT_ROWS, count))
        if target.quantized is not None:
            quantized += 1
            if quantized <= SPOT_QUANTIZED:
                checks.append(partial(_spot_quantized, task, target, rows, sources, plan.arithmetic))
            continue
        checks += [partial(_row_problems, task, target, row, sources, plan.arithmetic) for row in rows]
    # Each check is a few small ranged reads: on an object store, latency, so they overlap.
    with ThreadPoolExecutor(max_workers=SPOT_READERS, thread_name_prefix="spot-check") as pool:
        return [problem for found in pool.map(lambda check: check(), checks) for problem in found]


def _row_problems(*args) -> list[str]:
    """_spot_row's finding as a list, as _spot_quantized gives its own."""
    problem = _spot_row(*args)
    return [problem] if problem else []
