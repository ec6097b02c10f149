"""One merged tensor, from the bytes read for it: the single path by which the worker and
`lora-merge verify` turn a base tensor and its updates into W' (and the bytes to store).

    reads = tensor_reads(task, target, base, adapters)       # what to read, in this order
    outputs, stats = merged_tensor(task, target, data, job, workspace)   # data: the bytes of each read
    # outputs: [(tensor name, bytes)] in the order the shard stores them: one tensor, or a
    # quantized weight's parts (codes, scales, ...)

A quantized weight is decoded to float32 on the worker's device, fused there, and encoded again
in the base's format (or rounded once to bf16 with --dequantize); what the stored weight kept of
the adapter's update is measured on the way.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Callable, Mapping, Sequence

import torch

from merge_core.format import codecs
from merge_core.format.tensors import TORCH_DTYPES, resized, tensor_from_bytes
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


def shared_factors(task: ShardTask) -> Counter:
    """How many times the task reads each adapter factor (the experts of one MoE layer share lora_B)."""
    return Counter((u.adapter, f.start, f.nbytes) for t in task.targets for u in t.updates for f in u.factors)


def tensor_reads(task: ShardTask, target: FuseTarget, base: Storage, adapters: Sequence[Storage],
                 uses: Mapping | None = None) -> tuple[Read, ...]:
    """The base tensor's bytes, then each update's factors in turn. With `uses` (shared_factors),
    factors read by several tensors are marked shared, so the read-ahead fetches them once."""
    header = task.shard.header
    factors = tuple(Read(adapters[u.adapter], ADAPTER_WEIGHTS_NAME, u.data_start + f.start, f.nbytes,
                         shared=bool(uses) and uses[(u.adapter, f.start, f.nbytes)] > 1)
                    for u in target.updates for f in u.factors)
    if target.quantized is not None:  # every stored part, the codes (in this shard) first
        return (*(Read(base, p.shard, p.data_start + p.info.start, p.info.nbytes) for p in target.parts), *factors)
    info = header.tensor(target.base_tensor)
    return (Read(base, task.name, header.data_start + info.start, info.nbytes), *factors)


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
                  ) -> tuple[list[tuple[str, memoryview]], FuseStats]:
    """Fuse one tensor from the (writable) buffers its bytes were read into, in tensor_reads'
    order. A plain tensor is fused in place in `data[0]` (or, resized by an adapter, in a buffer
    of its own); a quantized weight goes through its codec."""
    if target.quantized is not None:
        return _merged_quantized(target, data, job, workspace, before_writing)
    info = task.shard.header.tensor(target.base_tensor)
    if target.restore:  # an unmerge PEFT cannot compute: the original base's own tensor
        original = OriginalShard(job, task.name).restore(target.tensor, info.dtype, info.shape)
        untouched = FuseStats(delta_norm=0.0, delta_max=0.0, weight_norm=0.0, nonfinite_introduced=0)
        return [(target.tensor, memoryview(original))], untouched
    buffer = data[0]
    weight = tensor_from_bytes(buffer, info.dtype, info.shape)
    if target.shape is not None:
        buffer, weight = resized(weight, target.shape)
    stats = _fuse(weight, target, data[1:], job, workspace, before_writing)
    return [(target.tensor, buffer)], stats


def _merged_quantized(target: FuseTarget, data: Sequence, job: MergeJob, workspace: Workspace,
                      before_writing: Callable[[], object] | None) -> tuple[list[tuple[str, memoryview]], FuseStats]:
    """decode → fuse in float32 → encode (or bf16), with what the stored weight kept of ΔW."""
    count = len(target.parts)
    stored = {p.role: tensor_from_bytes(d, p.info.dtype, p.info.shape).to(workspace.device)
              for p, d in zip(target.parts, data[:count])}
    codecs.check_stored(target.quantized, stored, {p.role: f"{job.base_uri.rstrip('/')}/{p.shard}"
                                                   for p in target.parts})
    weight = codecs.decode(target.quantized, stored)
    original = weight.clone() if target.updates else None
    stats = _fuse(weight, target, data[count:], job, workspace, before_writing)
    if target.dequantize:
        rounded = weight.to(TORCH_DTYPES[target.quantized.dtype])
        outputs = [(target.tensor, _host_bytes(rounded))]
        kept = rounded.float() if original is not None else None
    else:
        parts = codecs.encode(target.quantized, weight)
        outputs = [(p.info.name, _host_bytes(parts[p.role])) for p in target.parts]
        kept = codecs.decode(target.quantized, parts) if original is not None else None
    if kept is not None:
        stats = dataclasses.replace(stats, **survival(original, weight, kept))
    return outputs, stats


def survival(original: torch.Tensor, merged: torch.Tensor, stored: torch.Tensor) -> dict[str, float | None]:
    """How much of the update ΔW = merged − original the stored weight kept: the requantization error
    relative to ‖ΔW‖, and cos(stored − original, ΔW). Overwrites `original` and `stored`."""
    delta = original.neg_().add_(merged)  # ΔW
    delta_norm = float(torch.linalg.vector_norm(delta))
    if delta_norm == 0:
        return {"requant_error": None, "adapter_kept": None}
    error = stored.sub_(merged)  # deq(Q(W')) − W'
    requant_error = float(torch.linalg.vector_norm(error)) / delta_norm
    kept = error.add_(delta)  # deq(Q(W')) − deq(W)
    kept_norm = float(torch.linalg.vector_norm(kept))
    cosine = float(torch.dot(kept.reshape(-1), delta.reshape(-1))) / (kept_norm * delta_norm) if kept_norm else 0.0
    return {"requant_error": requant_error, "adapter_kept": cosine}


def _host_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes as the file stores them (little-endian, row-major), on the host."""
    return memoryview(tensor.detach().contiguous().cpu().view(torch.uint8).numpy()).cast("B")
