"""One quantized target, from the bytes read for it: decoded to float32 on the worker's device, fused
there, and encoded again in the base's format (or rounded once to bf16 with --dequantize), with what the
stored weight kept of the adapter's update measured on the way.

    outputs, fused = merged_quantized(target, parts, factors, job, workspace, fuse)
    # parts: per member (the target, then its fused siblings) the bytes of each stored part;
    # factors: per member the bytes of its updates' factors

--scales keep encodes against the base's own scales, zero points and global scales. --scales fresh
computes them from W′ as the format's reference quantizer does; fused siblings (q/k/v, gate/up, w1/w3)
whose base shares one tensor-level scale (byte for byte) share a fresh one again, computed from all of
them seen as one tensor (llm-compressor: the smallest global scale of theirs), and a sibling the adapters
leave alone keeps its bytes unless that shared scale moved.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from merge_core.format import codecs
from merge_core.format.tensors import TORCH_DTYPES, tensor_from_bytes
from merge_core.numerics.stats import FuseStats
from merge_core.numerics.workspace import Workspace
from merge_core.planning.plan import FuseTarget
from merge_core.worker.job import MergeJob

Fuse = Callable[[torch.Tensor, FuseTarget, Sequence], FuseStats]


@dataclass
class _Member:
    """One weight of the target: its stored parts (on the device), W′ in float32, W before the fuse."""
    target: FuseTarget
    stored: dict[str, torch.Tensor]
    raw: list  # the stored parts' bytes, written back when nothing changes them
    weight: torch.Tensor
    original: torch.Tensor | None
    stats: FuseStats | None


def _member(target: FuseTarget, raw: Sequence, factors: Sequence, job: MergeJob, workspace: Workspace,
            fuse: Fuse) -> _Member:
    stored = {p.role: tensor_from_bytes(d, p.info.dtype, p.info.shape).to(workspace.device)
              for p, d in zip(target.parts, raw)}
    codecs.check_stored(target.quantized, stored, {p.role: f"{job.base_uri.rstrip('/')}/{p.shard}"
                                                   for p in target.parts})
    weight = codecs.decode(target.quantized, stored)
    original = weight.clone() if target.updates else None
    stats = fuse(weight, target, factors) if target.updates or target.dequantize else None
    return _Member(target, stored, list(raw), weight, original, stats)


def merged_quantized(target: FuseTarget, parts: Sequence[Sequence], factors: Sequence[Sequence], job: MergeJob,
                     workspace: Workspace, fuse: Fuse) -> tuple[list[tuple[str, memoryview]], list]:
    """(outputs in the order the shard stores them, [(tensor, FuseStats)] of the members the adapters updated)."""
    members = [_member(m, p, f, job, workspace, fuse) for m, p, f in zip(target.members, parts, factors)]
    if target.dequantize:
        rounded = members[0].weight.to(TORCH_DTYPES[target.quantized.dtype])
        kept = rounded.float() if members[0].original is not None else None
        return [(target.tensor, host_bytes(rounded))], _measured(members[0], kept)
    shared, moved = _shared_scale(members)
    outputs, fused = [], []
    for member in members:
        weight = member.target.quantized
        if member.original is None and not moved:  # a sibling left alone whose scales stay: its bytes
            outputs += [(p.info.name, memoryview(raw)) for p, raw in zip(member.target.parts, member.raw)]
            continue
        encoded = codecs.encode(weight, member.weight, member.stored, keep=target.keep_scales, fixed=shared)
        outputs += [(p.info.name, host_bytes(encoded[p.role])) for p in member.target.parts]
        if member.original is not None:
            kept = codecs.decode(weight, encoded)
            names = tuple(m.target.tensor for m in members if m is not member) if shared is not None else ()
            fused += [(name, dataclasses.replace(stats, tied_with=names)) for name, stats in _measured(member, kept)]
    return outputs, fused


def _shared_scale(members: Sequence[_Member]) -> tuple[dict[str, torch.Tensor] | None, bool]:
    """(the siblings' fresh shared tensor-level parts, whether they differ from the base's), or (None,
    False) for a lone weight, kept scales, or siblings whose base does not share one."""
    first = members[0]
    if len(members) == 1 or first.target.keep_scales:
        return None, False
    roles = codecs.tensor_level(first.target.quantized)
    if not all(torch.equal(_bits(m.stored[r]), _bits(first.stored[r])) for m in members[1:] for r in roles):
        return None, False
    low = torch.stack([m.weight.amin() for m in members]).amin()
    high = torch.stack([m.weight.amax() for m in members]).amax()
    shared = codecs.tensor_level_for(first.target.quantized, low, high)
    moved = not all(torch.equal(_bits(shared[r]), _bits(first.stored[r])) for r in roles)
    return shared, moved


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes, whatever its shape (ModelOpt stores per-tensor scales as shape [])."""
    return tensor.reshape(-1).view(torch.uint8)


def _measured(member: _Member, kept: torch.Tensor | None) -> list[tuple[str, FuseStats]]:
    if member.stats is None:
        return []
    stats = member.stats
    if kept is not None:
        stats = dataclasses.replace(stats, **survival(member.original, member.weight, kept))
    return [(member.target.tensor, stats)]


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


def host_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes as the file stores them (little-endian, row-major), on the host."""
    flat = tensor.detach().contiguous().cpu().reshape(-1)  # flat: a (n, 1) tensor may keep a stride of its own
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")
