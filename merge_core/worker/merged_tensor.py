"""One merged tensor, from the bytes read for it: the single path by which the worker and
`lora-merge verify` turn a base tensor and its updates into W' (and the bytes to store).

    reads = tensor_reads(task, target, base, adapters)       # what to read, in this order
    outputs, stats = merged_tensor(task, target, data, job, workspace)   # data: the bytes of each read
    # outputs: [(tensor name, bytes)] in the order the shard stores them: one tensor, or a
    # quantized weight's parts (codes, scales, ...)

A quantized weight is decoded to float32 on the worker's device, fused there, and encoded again
in the base's format (or rounded once to bf16 with --dequantize): merge_core.worker.quantized_tensor.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Mapping, Sequence

import torch

from merge_core.format.tensors import resized, tensor_from_bytes
from merge_core.io.pipeline import Read
from merge_core.io.storage import Storage
from merge_core.names import ADAPTER_WEIGHTS_NAME
from merge_core.numerics.arithmetic import Arithmetic
from merge_core.numerics.fuse import fuse_into
from merge_core.numerics.ops import Term
from merge_core.numerics.stats import FuseStats
from merge_core.numerics.workspace import Workspace
from merge_core.planning.plan import FuseTarget, ShardTask
from merge_core.worker.job import MergeJob
from merge_core.worker.original import OriginalShard
from merge_core.worker.quantized_tensor import merged_quantized


def shared_factors(task: ShardTask) -> Counter:
    """How many times the task reads each adapter factor (the experts of one MoE layer share lora_B)."""
    return Counter((u.adapter, f.start, f.nbytes) for t in task.targets for m in t.members for u in m.updates
                   for f in u.factors)


def tensor_reads(task: ShardTask, target: FuseTarget, base: Storage, adapters: Sequence[Storage],
                 uses: Mapping | None = None) -> tuple[Read, ...]:
    """The base tensor's bytes, then each update's factors in turn. With `uses` (shared_factors),
    factors read by several tensors are marked shared, so the read-ahead fetches them once."""
    header = task.shard.header

    def factors(member: FuseTarget) -> tuple[Read, ...]:
        return tuple(Read(adapters[u.adapter], ADAPTER_WEIGHTS_NAME, u.data_start + f.start, f.nbytes,
                          shared=bool(uses) and uses[(u.adapter, f.start, f.nbytes)] > 1)
                     for u in member.updates for f in u.factors)

    if target.quantized is not None:  # each member's stored parts (the codes, in this shard, first), its factors
        return tuple(read for m in target.members for read in (
            *(Read(base, p.shard, p.data_start + p.info.start, p.info.nbytes) for p in m.parts), *factors(m)))
    info = header.tensor(target.base_tensor)
    return (Read(base, task.name, header.data_start + info.start, info.nbytes), *factors(target))


def update_terms(target: FuseTarget, factor_bytes: Sequence, arithmetic: Arithmetic) -> list[Term]:
    """The fuse's terms from the bytes read for a target's updates (each update's factors, in
    turn). Each adapter's --weight is folded into its scale, unless the adapters are combined
    (--combine), which weighs their full deltas itself."""
    remaining = iter(factor_bytes)
    terms = []
    for u in target.updates:
        tensors = {role: tensor_from_bytes(next(remaining), f.dtype, f.shape) for role, f in zip(u.roles, u.factors)}
        scale = u.scale if arithmetic.combine is not None else u.scale * u.weight
        terms.append(Term(u.kind, tensors, scale, transpose=u.transpose, side=u.side, experts=u.experts,
                          weight=u.weight))
    return terms


def _fuse(weight: torch.Tensor, target: FuseTarget, factor_bytes: Sequence, job: MergeJob, workspace: Workspace,
          before_writing: Callable[[], object] | None) -> FuseStats:
    return fuse_into(weight, update_terms(target, factor_bytes, job.arithmetic), workspace, job.arithmetic,
                     name=target.tensor, before_writing=before_writing)


def merged_tensor(task: ShardTask, target: FuseTarget, data: Sequence, job: MergeJob, workspace: Workspace,
                  before_writing: Callable[[], object] | None = None
                  ) -> tuple[list[tuple[str, memoryview]], list[tuple[str, FuseStats]]]:
    """Fuse one tensor from the (writable) buffers its bytes were read into, in tensor_reads'
    order: (what to write, in order; what each fuse measured, by tensor). A plain tensor is fused in
    place in `data[0]` (or, resized by an adapter, in a buffer of its own); a quantized weight (with
    its fused siblings) goes through its codec."""
    if target.quantized is not None:
        parts, factors, position = [], [], 0
        for member in target.members:
            count = len(member.parts) + sum(len(u.factors) for u in member.updates)
            parts.append(data[position:position + len(member.parts)])
            factors.append(data[position + len(member.parts):position + count])
            position += count
        return merged_quantized(target, parts, factors, job, workspace,
                                lambda w, m, f: _fuse(w, m, f, job, workspace, before_writing))
    info = task.shard.header.tensor(target.base_tensor)
    if target.restore:  # an unmerge PEFT cannot compute: the original base's own tensor
        original = OriginalShard(job, task.name).restore(target.tensor, info.dtype, info.shape)
        untouched = FuseStats(delta_norm=0.0, delta_max=0.0, weight_norm=0.0, nonfinite_introduced=0)
        return [(target.tensor, memoryview(original))], [(target.tensor, untouched)]
    buffer = data[0]
    weight = tensor_from_bytes(buffer, info.dtype, info.shape)
    if target.shape is not None:
        buffer, weight = resized(weight, target.shape)
    stats = _fuse(weight, target, data[1:], job, workspace, before_writing)
    return [(target.tensor, buffer)], [(target.tensor, stats)]
