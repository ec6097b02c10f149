"""Publish a merged checkpoint: check the shards, copy the other files, write the index last.

The index is the commit marker: until it exists the output is not a model, whatever else is
there. It is created exclusively, so two jobs racing on one output cannot both publish.
"""

from __future__ import annotations

import json
from typing import Mapping, Sequence

from merge_core.checkpoint import INDEX_NAME, MANIFEST_NAME
from merge_core.errors import ValidationError
from merge_core.plan import MergePlan
from merge_core.shard_merge import ShardResult
from merge_core.storage import Storage, copy_object


def check_shards(plan: MergePlan, results: Sequence[ShardResult], output: Storage) -> None:
    """Every planned shard was reported, and storage holds exactly the bytes each worker wrote."""
    reported = {r.name: r for r in results}
    for task in plan.tasks:
        result = reported.get(task.name)
        if result is None:
            raise ValidationError(output.describe(task.name), "no worker reported this shard")
        if not output.exists(task.name):
            raise ValidationError(output.describe(task.name), "missing from the output")
        stored = output.size(task.name)
        if stored != result.size:
            raise ValidationError(output.describe(task.name),
                                  f"storage holds {stored} bytes but the worker wrote {result.size}")


def build_index(plan: MergePlan, base_metadata: Mapping[str, object]) -> tuple[dict, int]:
    weight_map = {info.name: task.name for task in plan.tasks for info in task.shard.header.tensors}
    total_size = sum(info.nbytes for task in plan.tasks for info in task.shard.header.tensors)
    metadata = dict(base_metadata) | {"total_size": total_size}
    return {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}, total_size


def copy_extra_files(base: Storage, output: Storage, names: Sequence[str]) -> list[dict]:
    copied = []
    for name in names:
        size, sha = copy_object(base, output, name)
        copied.append({"name": name, "size": size, "sha256": sha})
    return copied


def publish(output: Storage, index: Mapping[str, object], manifest: Mapping[str, object]) -> None:
    # Uploads abandoned by killed (and retried) workers would otherwise linger, and be billed.
    output.discard_incomplete()
    output.write_bytes(MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
    try:
        output.write_bytes(INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode(), exclusive=True)
    except FileExistsError:
        raise RuntimeError(f"{output.describe(INDEX_NAME)}: another job published a model here while this one "
                           "ran; this run's output was not published") from None
