"""`lora-merge verify`'s check of one merged shard: every byte re-read, hashed against the
manifest, and each tensor compared with a fresh merge of the base through the worker's own path
(merge_core.worker.merged_tensor), on this CPU."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from merge_core.errors import InputError, raise_if_stopped
from merge_core.format import codecs
from merge_core.format.header import ShardHeader, TensorInfo
from merge_core.format.tensors import tensor_from_bytes
from merge_core.inputs.checkpoint import read_shard_header
from merge_core.io.hashing import DEFAULT_DIGEST, TimedDigest, algorithm_of
from merge_core.io.pipeline import Item, Read, read_ahead
from merge_core.io.registry import open_storage
from merge_core.io.storage import Storage
from merge_core.numerics.ulps import describe_difference
from merge_core.numerics.workspace import workspace_for
from merge_core.planning.plan import FuseTarget, ShardTask
from merge_core.worker.job import MergeJob
from merge_core.worker.merged_tensor import merged_tensor, tensor_reads


@dataclass(frozen=True, kw_only=True)
class ShardVerdict:
    """What one merged shard's check found: its problems, and the size and digest of the bytes read."""
    name: str
    problems: tuple[str, ...]  # none: the shard is what its inputs make
    digest: str  # tagged (merge_core.io.hashing), with the manifest's algorithm for this shard
    size: int
    tensors_checked: int


def _owners(task: ShardTask) -> dict[str, FuseTarget]:
    """Each output tensor of a fused target → that target (a quantized weight owns all its parts)."""
    owners = {}
    for target in task.targets:
        names = [name for name, _, _ in target.output_tensors] if target.quantized is not None else [target.tensor]
        owners.update({name: target for name in names})
    return owners


def _items(task: ShardTask, header: ShardHeader, job: MergeJob, merged: Storage, problems: list[str]) -> list[Item]:
    """Each tensor of the merged file, in its order (so that its bytes hash in sequence), with what a
    fresh merge of it reads: a fused target's outputs (a quantized weight's parts, together) in one
    item, an untouched tensor with its base bytes."""
    base = open_storage(job.base_uri, job.storage)
    adapters = [open_storage(u, job.storage) for u in job.adapter_uris]
    base_header = task.shard.header
    owners = _owners(task)
    planned = {name for name, _, _ in task.output_tensors}
    infos = list(header.tensors)
    items, position = [], 0
    while position < len(infos):
        info = infos[position]
        stored = Read(merged, task.name, header.data_start + info.start, info.nbytes)
        target = owners.get(info.name)
        if info.name not in planned:
            problems.append(f"{merged.describe(task.name)}: tensor {info.name} is neither in the base shard nor "
                            "added by the merge")
            items.append(Item(([info], None), (stored,)))
        elif target is not None:
            group = infos[position:position + len([o for o in owners if owners[o] is target])]
            reads = [Read(merged, task.name, header.data_start + i.start, i.nbytes) for i in group]
            items.append(Item((group, target), (*reads, *tensor_reads(task, target, base, adapters))))
            position += len(group) - 1
        else:
            base_info = base_header.tensor(info.name)
            items.append(Item(([info], info.name), (stored, Read(base, task.name, base_header.data_start
                                                                  + base_info.start, base_info.nbytes))))
        position += 1
    return items


def _compare(infos: list[TensorInfo], data: list, source, task: ShardTask, job: MergeJob, planned: dict,
             fused_ulps: int, where: str) -> list[str]:
    """The stored tensors of one item against a fresh merge (or the base bytes) of them."""
    problems = []
    stored = data[:len(infos)]
    if isinstance(source, str):
        expected = {source: data[1]}
    else:
        outputs, _ = merged_tensor(task, source, data[len(infos):], job, workspace_for("cpu"))
        expected = dict(outputs)
        if fused_ulps and source.quantized is not None and not source.dequantize:
            return _compare_decoded(infos, stored, expected, source, where)
    for info, raw in zip(infos, stored):
        dtype, shape = planned[info.name]
        if (info.dtype, tuple(info.shape)) != (dtype, shape) or info.name not in expected:
            problems.append(f"{where}: tensor {info.name} is {info.dtype}{list(info.shape)}, "
                            f"the merge makes it {dtype}{list(shape)}")
            continue
        difference = describe_difference(info.name, tensor_from_bytes(raw, info.dtype, info.shape),
                                          tensor_from_bytes(expected[info.name], dtype, shape),
                                          0 if isinstance(source, str) else fused_ulps)
        if difference:
            problems.append(f"{where}: {difference}")
    return problems


def _compare_decoded(infos: list[TensorInfo], stored: list, expected: dict, source: FuseTarget,
                     where: str) -> list[str]:
    """A quantized weight fused on a GPU, whose W' may differ by an ulp from this CPU's: its codes (and
    fresh scales) may differ too, but its decoded values by no more than one step of its format."""
    read = {info.name: tensor_from_bytes(raw, info.dtype, info.shape) for info, raw in zip(infos, stored)}
    problems = []
    for member in source.members:
        names = [(p.role, p.info) for p in member.parts]
        if any(info.name not in read or tuple(read[info.name].shape) != info.shape for _, info in names):
            problems.append(f"{where}: tensor {member.tensor}: its stored parts are not the base's layout")
            continue
        ours = {role: read[info.name] for role, info in names}
        fresh = {role: tensor_from_bytes(expected[info.name], info.dtype, info.shape) for role, info in names}
        if all(torch.equal(ours[r].reshape(-1).view(torch.uint8), fresh[r].reshape(-1).view(torch.uint8))
               for r in ours):
            continue
        off = (codecs.decode(member.quantized, ours) - codecs.decode(member.quantized, fresh)).abs()
        bad = int((off > codecs.step(member.quantized, fresh)).sum())
        if bad:
            problems.append(f"{where}: tensor {member.tensor}: {bad} elements lie more than one "
                            f"{member.quantized.codec} step from a fresh merge")
    return problems


def verify_shard(task: ShardTask, job: MergeJob, expected_size: int | None, expected_digest: str | None,
                 fused_ulps: int = 0, stop: threading.Event | None = None) -> ShardVerdict:
    """Re-read every byte of one merged shard (at job.output_uri) and compare it with a fresh merge
    of the base shard. Fused tensors may differ by `fused_ulps` (1 for shards fused on a GPU, whose
    products sum in another order), a quantized weight's decoded values then by one step of its format;
    untouched tensors and the digest (tagged: recomputed with the manifest's own algorithm, sha256 in
    manifests written before BLAKE3) must match exactly. `stop`: when set, it ends at its next
    tensor (Stopped)."""
    merged = open_storage(job.output_uri, job.storage)
    where = merged.describe(task.name)
    try:
        header = read_shard_header(merged, task.name)
    except (InputError, FileNotFoundError) as exc:
        return ShardVerdict(name=task.name, problems=(str(exc),), digest="", size=0, tensors_checked=0)
    problems: list[str] = []
    algorithm = algorithm_of(expected_digest) if expected_digest else DEFAULT_DIGEST
    digest = TimedDigest(algorithm)
    digest.update(merged.read_range(task.name, 0, header.data_start))
    planned = {name: (dtype, tuple(shape)) for name, dtype, shape in task.output_tensors}
    checked = 0
    for (infos, source), data in read_ahead(_items(task, header, job, merged, problems)):
        raise_if_stopped(stop, where)
        for raw in data[:len(infos)]:
            digest.update(raw)
        if source is not None:
            problems += _compare(infos, data, source, task, job, planned, fused_ulps, where)
            checked += len(infos)
    missing = sorted(set(planned) - set(header.names))
    if missing:
        problems.append(f"{where}: {len(missing)} tensors missing, e.g. {missing[:3]}")
    size, found = merged.size(task.name), digest.value()
    if expected_digest is not None and (found != expected_digest or size != expected_size):
        problems.append(f"{where}: {algorithm} {found} ({size} bytes) differs from the manifest's {expected_digest} "
                        f"({expected_size} bytes)")
    return ShardVerdict(name=task.name, problems=tuple(problems), digest=found, size=size, tensors_checked=checked)
