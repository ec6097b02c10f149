"""The final task's numeric spot check: sampled rows of fused tensors recomputed in float64, from
the base and adapter bytes, and compared with what was stored.

Deliberately not the fuse (merge_core.numerics.fuse) run again: an independent evaluation of
W + Σ s·(B·A) in float64, with a bound on how far a correct float32 evaluation may stray.
"""

from __future__ import annotations

import random
from typing import Mapping, Sequence

import torch

from merge_core.format.header import ShardHeader, TensorInfo
from merge_core.format.tensors import TORCH_DTYPES, tensor_from_bytes
from merge_core.io.storage import Storage
from merge_core.kinds import Kind
from merge_core.names import ADAPTER_WEIGHTS_NAME
from merge_core.numerics.ulps import ulp_distance
from merge_core.planning.plan import FuseTarget, MergePlan, ShardTask, Update

SPOT_TENSORS = 8
SPOT_ROWS = 4


def _row(storage: Storage, name: str, data_start: int, info: TensorInfo, row: int) -> torch.Tensor:
    row_bytes = info.nbytes // info.shape[0]
    raw = storage.read_range(name, data_start + info.start + row * row_bytes, row_bytes)
    return tensor_from_bytes(raw, info.dtype, info.shape[1:])


def _spot_row(task: ShardTask, target: FuseTarget, row: int, base: Storage, adapters: Sequence[Storage],
              output: Storage, out_header: ShardHeader, sequential: bool = False) -> str | None:
    info = task.shard.header.tensor(target.tensor)
    weight = _row(base, task.name, task.shard.header.data_start, info, row).double()
    exact, bound = weight.clone(), weight.abs()
    rounded_delta = torch.zeros_like(exact)  # |ΔW| PEFT rounds to the weight's dtype before adding it
    for u in target.updates:
        adapter = adapters[u.adapter]
        scale = u.scale * u.weight
        if u.kind is Kind.BIAS:  # element `row` of lora_B's bias, scaled
            b_elem = _row(adapter, ADAPTER_WEIGHTS_NAME, u.data_start, u.factors[0], row).double()
            exact += b_elem * scale
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
        exact += term
        bound += (left.abs() @ right.abs()) * abs(scale)
        if u.kind.rounds_delta:
            rounded_delta += term.abs()
    stored = _row(output, task.output_name, out_header.data_start, out_header.tensor(target.tensor), row)
    ulps = ulp_distance(stored, exact.to(TORCH_DTYPES[info.dtype]))
    # The merge evaluates W + Σ scale·(B·A) in float32, then rounds once. Evaluating a rank-r sum
    # in float32 may err by about r·eps32·Σ|terms|, which matters where W and ΔW nearly cancel;
    # rounding then adds up to one unit of the stored value. Within that, the merge was right.
    # LoRA on parameters rounds ΔW first, which may move it by half a unit of ΔW itself.
    rank = max(u.factors[0].shape[0] if u.kind.facts.low_rank else 1 for u in target.updates)
    finfo = torch.finfo(stored.dtype)
    magnitude = stored.double().abs()
    unit = torch.where(magnitude > 0, 2.0 ** torch.floor(torch.log2(magnitude.clamp_min(finfo.tiny))) * finfo.eps,
                       torch.full_like(magnitude, finfo.tiny))
    allowed = unit + 4 * (rank + 2) * torch.finfo(torch.float32).eps * bound + finfo.eps * rounded_delta
    if sequential:  # each adapter's result rounded, by up to half a unit of that intermediate value
        allowed += (len(target.updates) - 1) * finfo.eps * bound
    bad = (ulps > len(target.updates)) & ~((stored.double() - exact).abs() <= len(target.updates) * allowed)
    if bool(bad.any()):
        return (f"{output.describe(task.output_name)}: tensor {target.tensor} row {row}: {int(bad.sum())} elements differ "
                f"from the float64 recomputation by up to {int(ulps.max())} ulp")
    return None


def _row_recomputable(update: Update) -> bool:
    """Kinds whose row the spot check recomputes: LoRA on linear layers, lora_bias, and LoRA on
    2-D parameters or on one expert's tensor."""
    if update.kind is Kind.BIAS:
        return True
    if update.kind is Kind.PARAM:
        return update.experts.two_d
    return update.kind is Kind.LORA and len(update.factors[0].shape) == 2


def spot_check(plan: MergePlan, base: Storage, adapters: Sequence[Storage], output: Storage,
               headers: Mapping[str, ShardHeader], seed: int = 0) -> list[str]:
    """Recompute sampled rows of sampled fused tensors in float64 and compare with what was stored.
    Tensors updated by LoRA on linear layers, lora_bias and LoRA on 2-D parameters or experts
    stored one by one are sampled: the other kinds are
    checked against a fresh merge by `lora-merge verify`, and so are merges with --combine, whose
    pruning the float64 row recomputation does not repeat."""
    if plan.combine is not None:
        return []
    rng = random.Random(seed)
    fused = [(t, f) for t in plan.tasks for f in t.targets if t.name in headers and f.updates
             and all(_row_recomputable(u) for u in f.updates)]
    problems = []
    for task, target in rng.sample(fused, min(SPOT_TENSORS, len(fused))):
        rows = task.shard.header.tensor(target.tensor).shape[0]
        for row in rng.sample(range(rows), min(SPOT_ROWS, rows)):
            problem = _spot_row(task, target, row, base, adapters, output, headers[task.name], plan.sequential)
            if problem:
                problems.append(problem)
    return problems
