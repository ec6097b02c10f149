"""The final task's structural checks of a merged checkpoint, before its index is written:
every planned tensor in its shard with its dtype and shape, the index, the rewritten config.
(Numbers are checked by merge_core.publish.spot_check; `lora-merge verify` re-merges every
tensor, merge_core.publish.verify.)
"""

from __future__ import annotations

import json
from typing import Mapping

from merge_core.errors import InputError
from merge_core.format.header import ShardHeader
from merge_core.inputs.checkpoint import read_shard_header
from merge_core.io.storage import Storage
from merge_core.names import CONFIG_JSON
from merge_core.planning.plan import MergePlan


def check_headers(plan: MergePlan, output: Storage) -> tuple[list[str], dict[str, ShardHeader]]:
    """Every base tensor is in the output shard of the same name, with its dtype and shape (a
    resized vocabulary's new shape), and so is every tensor the merge adds; nothing else is."""
    problems, headers = [], {}
    for task in plan.tasks:
        try:
            header = headers[task.name] = read_shard_header(output, task.output_name)
        except InputError as exc:
            problems.append(str(exc))
            continue
        stored = {t.name: (t.dtype, t.shape) for t in header.tensors}
        expected = task.output_tensors
        for name, dtype, shape in expected:
            if stored.get(name) != (dtype, tuple(shape)):
                found = stored.get(name)
                problems.append(f"{output.describe(task.output_name)}: tensor {name} should be "
                                f"{dtype}{list(shape)}, found {'nothing' if found is None else found}")
        extra = sorted(set(stored) - {name for name, _, _ in expected})
        if extra:
            problems.append(f"{output.describe(task.output_name)}: unexpected tensors {extra[:5]}")
    return problems, headers


def check_index(plan: MergePlan, index: Mapping[str, object], headers: Mapping[str, ShardHeader]) -> list[str]:
    expected_map = {name: t.name for t in plan.tasks for name, _, _ in t.output_tensors}
    problems = []
    if index.get("weight_map") != expected_map:
        problems.append("model.safetensors.index.json: weight_map differs from the planned one")
    total = sum(t.nbytes for h in headers.values() for t in h.tensors)
    if index.get("metadata", {}).get("total_size") != total:
        problems.append(f"model.safetensors.index.json: total_size {index.get('metadata', {}).get('total_size')} "
                        f"but the shards hold {total} tensor bytes")
    return problems


def check_config(plan: MergePlan, output: Storage) -> list[str]:
    """config.json says what the merge changed: a resized vocabulary's vocab_size, an untied head's
    tie_word_embeddings, no quantization_config after --dequantize."""
    if not plan.config_updates and not plan.config_removed:
        return []
    where = output.describe(CONFIG_JSON)
    try:
        config = json.loads(output.read_bytes(CONFIG_JSON))
    except (FileNotFoundError, ValueError):
        changed = sorted([*plan.config_updates, *plan.config_removed])
        return [f"{where}: missing or not JSON, but the merge changes {changed}"]
    return ([f"{where}: {key} is {config.get(key)!r}, the merge makes it {value!r}"
             for key, value in plan.config_updates.items() if config.get(key) != value]
            + [f"{where}: still has {key}, which the merge removes" for key in plan.config_removed if key in config])
