"""One merged tensor, from the bytes read for it: the single path by which the worker, the final
spot check's reads and `lora-merge verify` turn a base tensor and its updates into W'.

    reads = tensor_reads(task, target, base, adapters)       # what to read, in this order
    buffer, stats = merged_tensor(task, target, data, spec, workspace)   # data: the bytes of each read
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from typing import Callable, Mapping, Sequence

from merge_core.format.tensors import resized, tensor_from_bytes
from merge_core.io.pipeline import Read
from merge_core.io.storage import Storage
from merge_core.names import ADAPTER_WEIGHTS_NAME
from merge_core.numerics.combine import combine_deltas
from merge_core.numerics.fuse import Term, fuse_into
from merge_core.numerics.stats import FuseStats
from merge_core.numerics.workspace import Workspace
from merge_core.planning.plan import FuseTarget, ShardTask
from merge_core.worker.spec import MergeSpec


def shared_factors(task: ShardTask) -> Counter:
    """How many times the task reads each adapter factor (the experts of one MoE layer share lora_B)."""
    return Counter((u.adapter, f.start, f.nbytes) for t in task.targets for u in t.updates for f in u.factors)


def tensor_reads(task: ShardTask, target: FuseTarget, base: Storage, adapters: Sequence[Storage],
                 uses: Mapping | None = None) -> tuple[Read, ...]:
    """The base tensor's bytes, then each update's factors in turn. With `uses` (shared_factors),
    factors read by several tensors are marked shared, so the read-ahead fetches them once."""
    header = task.shard.header
    info = header.tensor(target.base_tensor)
    factors = tuple(Read(adapters[u.adapter], ADAPTER_WEIGHTS_NAME, u.data_start + f.start, f.nbytes,
                         shared=bool(uses) and uses[(u.adapter, f.start, f.nbytes)] > 1)
                    for u in target.updates for f in u.factors)
    return (Read(base, task.name, header.data_start + info.start, info.nbytes), *factors)


def update_terms(target: FuseTarget, factor_bytes: Sequence, combining: bool = False) -> list[Term]:
    """The fuse's terms from the bytes read for a target's updates (each update's factors, in
    turn). Each adapter's --weight is folded into its scale, unless the adapters are combined
    (--combine), which weighs their full deltas itself."""
    remaining = iter(factor_bytes)
    terms = []
    for u in target.updates:
        tensors = {role: tensor_from_bytes(next(remaining), f.dtype, f.shape) for role, f in zip(u.roles, u.factors)}
        terms.append(Term(u.kind, tensors, u.scale if combining else u.scale * u.weight, u.transpose, u.side,
                          u.experts))
    return terms


def merged_tensor(task: ShardTask, target: FuseTarget, data: Sequence, spec: MergeSpec, workspace: Workspace,
                  before_writing: Callable[[], object] | None = None) -> tuple[memoryview, FuseStats]:
    """Fuse one tensor in the (writable) buffer its bytes were read into, `data[0]`, which then
    holds the merged bytes; a tensor an adapter resizes is fused in a buffer of its own, returned
    in its place. `data[1:]`: the factors, as tensor_reads orders them."""
    info = task.shard.header.tensor(target.base_tensor)
    buffer = data[0]
    weight = tensor_from_bytes(buffer, info.dtype, info.shape)
    if target.shape is not None:
        buffer, weight = resized(weight, target.shape)
    combiner = None
    if spec.combine is not None:  # the plan allows only additive updates with --combine
        combiner = partial(combine_deltas, weights=[u.weight for u in target.updates], spec=spec.combine,
                           tensor_name=target.tensor)
    stats = fuse_into(weight, update_terms(target, data[1:], spec.combine is not None), workspace, before_writing,
                      spec.sequential, combiner)
    return buffer, stats
