"""`lora-merge verify`'s check of one merged shard: every byte re-read, hashed against the
manifest, and each tensor compared with a fresh merge of the base through the worker's own path
(merge_core.worker.merged_tensor), on this CPU."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from merge_core.errors import InputError
from merge_core.format.header import ShardHeader
from merge_core.format.tensors import tensor_from_bytes
from merge_core.inputs.checkpoint import read_shard_header
from merge_core.io.pipeline import Item, Read, read_ahead
from merge_core.io.registry import open_storage
from merge_core.io.storage import Storage
from merge_core.numerics.ulps import describe_difference
from merge_core.numerics.workspace import workspace_for
from merge_core.planning.plan import ShardTask
from merge_core.worker.merged_tensor import merged_tensor, tensor_reads
from merge_core.worker.spec import MergeSpec


@dataclass(frozen=True)
class ShardVerdict:
    name: str
    problems: tuple[str, ...]
    sha256: str
    size: int
    tensors_checked: int


def _items(task: ShardTask, header: ShardHeader, spec: MergeSpec, merged: Storage, problems: list[str]) -> list[Item]:
    """Each tensor of the merged file, in its order (so that its bytes hash in sequence), with the
    base tensor and factors a fresh merge of it reads."""
    base = open_storage(spec.base_uri, spec.storage)
    adapters = [open_storage(u, spec.storage) for u in spec.adapter_uris]
    base_header = task.shard.header
    targets = {t.tensor: t for t in task.targets}
    planned = {name for name, _, _ in task.output_tensors}
    items = []
    for info in header.tensors:
        stored = Read(merged, task.name, header.data_start + info.start, info.nbytes)
        target = targets.get(info.name)
        if info.name not in planned:
            problems.append(f"{merged.describe(task.name)}: tensor {info.name} is neither in the base shard nor "
                            "added by the merge")
            items.append(Item((info, None), (stored,)))
        elif target is not None:
            items.append(Item((info, target), (stored, *tensor_reads(task, target, base, adapters))))
        else:
            base_info = base_header.tensor(info.name)
            items.append(Item((info, info.name), (stored, Read(base, task.name, base_header.data_start
                                                                + base_info.start, base_info.nbytes))))
    return items


def verify_shard(task: ShardTask, spec: MergeSpec, expected_size: int | None, expected_sha256: str | None,
                 fused_ulps: int = 0) -> ShardVerdict:
    """Re-read every byte of one merged shard (at spec.output_uri) and compare it with a fresh merge
    of the base shard. Fused tensors may differ by `fused_ulps` (1 for shards fused on a GPU, whose
    products sum in another order); untouched tensors and the sha256 must match exactly."""
    merged = open_storage(spec.output_uri, spec.storage)
    where = merged.describe(task.name)
    try:
        header = read_shard_header(merged, task.name)
    except (InputError, FileNotFoundError) as exc:
        return ShardVerdict(task.name, (str(exc),), "", 0, 0)
    problems: list[str] = []
    digest = hashlib.sha256(merged.read_range(task.name, 0, header.data_start))
    planned = {name: (dtype, tuple(shape)) for name, dtype, shape in task.output_tensors}
    workspace = workspace_for("cpu")
    checked = 0
    for (info, source), data in read_ahead(_items(task, header, spec, merged, problems)):
        digest.update(data[0])
        if source is None:
            continue
        dtype, shape = planned[info.name]
        if (info.dtype, tuple(info.shape)) != (dtype, shape):
            problems.append(f"{where}: tensor {info.name} is {info.dtype}{list(info.shape)}, "
                            f"the merge makes it {dtype}{list(shape)}")
            continue
        stored = tensor_from_bytes(data[0], info.dtype, info.shape)
        fused = not isinstance(source, str)
        expected = merged_tensor(task, source, data[1:], spec, workspace)[0] if fused else data[1]
        difference = describe_difference(info.name, stored, tensor_from_bytes(expected, dtype, shape),
                                          fused_ulps if fused else 0)
        if difference:
            problems.append(f"{where}: {difference}")
        checked += 1
    missing = sorted(set(planned) - set(header.names))
    if missing:
        problems.append(f"{where}: {len(missing)} tensors missing, e.g. {missing[:3]}")
    size, sha = merged.size(task.name), digest.hexdigest()
    if expected_sha256 is not None and (sha != expected_sha256 or size != expected_size):
        problems.append(f"{where}: sha256 {sha} ({size} bytes) differs from the manifest's {expected_sha256} "
                        f"({expected_size} bytes)")
    return ShardVerdict(task.name, tuple(problems), sha, size, checked)
