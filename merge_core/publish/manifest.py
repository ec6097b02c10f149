"""merge_manifest.json: where the merged model came from and what was done to it."""

from __future__ import annotations

import dataclasses
import datetime
import math
from importlib import metadata
from typing import Mapping, Sequence

from merge_core.inputs.adapter import LoraAdapter
from merge_core.io.hashing import DEFAULT_DIGEST, record_fields
from merge_core.planning.plan import MergePlan
from merge_core.publish.publication import Publication
from merge_core.worker.shard_result import ShardResult

MANIFEST_VERSION = 1


def tool_version() -> str:
    try:
        return metadata.version("lora-merge")
    except metadata.PackageNotFoundError:
        return "unknown"


def adapter_record(adapter: LoraAdapter, weight: float, files: Sequence[Mapping[str, object]]) -> dict:
    return {
        "uri": adapter.uri,
        "weight": weight,
        "config": dict(adapter.config),
        "files": list(files),
        "peft_type": adapter.peft_type,
        # by module; by parameter for LoRA on parameters, several of which one module may hold
        "scales": {u.target if u.kind.facts.per_parameter else u.module: u.scale for u in adapter.updates
                   if u.kind.facts.scaled},
    }


def shard_record(result: ShardResult, plan: MergePlan, retries: int = 0, reused: bool = False) -> dict:
    record = {k: v for k, v in dataclasses.asdict(result).items() if k not in ("fused_stats", "digest", "base_digest")}
    task = next(t for t in plan.tasks if t.name == result.name)
    # each digest under its algorithm's name: {"blake3": hex}, or {"sha256": hex} as registries read it
    record = {"name": record.pop("name"), "size": record.pop("size")} | record_fields(result.digest) | \
        record_fields(result.base_digest, "base_") | record
    return record | {"fused_tensors": [f.tensor for f in task.targets], "retries": retries, "reused": reused}


def recovery(plan: MergePlan, results: Sequence[ShardResult], original: str) -> dict:
    """An unmerge against the original base: what came back bit for bit. Tensors it did not touch
    are the merged model's, which the merge copied from that base byte for byte."""
    compared = {name: s for r in results for name, s in r.fused_stats if s.recovered_equal is not None}
    tensors = [(name, math.prod(shape)) for t in plan.tasks for name, _, shape in t.output_tensors]
    fused = {f.tensor for t in plan.tasks for f in t.targets}
    elements = sum(n for _, n in tensors)
    identical = sum(n for name, n in tensors if name not in fused) + sum(s.recovered_equal for s in compared.values())
    whole = sum(1 for name, n in tensors if name not in fused or (name in compared and compared[name].recovered_equal
                                                                   == n))
    return {"original": original, "tensors": len(tensors), "tensors_identical": whole,
            "tensors_compared": len(compared), "elements": elements, "elements_identical": identical,
            "max_ulps": max((s.recovered_max_ulps or 0 for s in compared.values()), default=0)}


def requantization(plan: MergePlan, results: Sequence[ShardResult]) -> dict:
    """How quantized weights were stored again: --scales, and the fused siblings whose base shares one
    tensor-level scale and that share a fresh one again (--scales fresh; kept scales stay shared)."""
    tied = {tuple(sorted((name, *stats.tied_with))) for r in results for name, stats in r.fused_stats
            if stats.tied_with}
    return {"scales": plan.scales, "tied": [list(group) for group in sorted(tied)]}


def build_manifest(plan: MergePlan, publication: Publication, *, copied_files: Sequence[Mapping[str, object]],
                   total_size: int, timings: Mapping[str, float], digest: str = DEFAULT_DIGEST) -> dict:
    results, reused = publication.results, publication.reused
    retry_reasons = dict(publication.retry_reasons) | (
        {"final task": publication.final_retries} if publication.final_retries else {})
    by_name = {r.name: r for r in results}
    history = {"lineage": dict(publication.lineage)} if publication.lineage else {}
    original = publication.original_uri
    recovered = {"recovery": recovery(plan, results, original)} if original else {}
    return history | recovered | {
        "manifest_version": MANIFEST_VERSION,
        "tool": {"name": "lora-merge", "version": tool_version()},
        # the algorithm of the shards' digests (each record names its own too: a resumed run keeps
        # the shards an earlier one proved, with the digests it recorded)
        "digest": digest,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "base": {
            "uri": plan.base_uri,
            "shards": [{"name": t.name, "size": t.shard.size} | record_fields(by_name[t.name].base_digest)
                       for t in plan.tasks],
        },
        "adapters": list(publication.adapter_records),
        "output": {
            "total_size": total_size,
            "shards": [shard_record(by_name[t.name], plan, publication.retries.get(t.name, 0), t.name in reused)
                       for t in plan.tasks],
            "files": list(copied_files),
        },
        "arithmetic": plan.arithmetic.as_json(),
        # config.json keys rewritten, tensors resized (a new vocabulary) or added (an untied head)
        "model_changes": plan.model_changes,
        "requantization": requantization(plan, results),
        "fused_tensor_count": plan.fused_tensor_count,
        "reused_shards": len(reused),
        "fingerprint": publication.fingerprint,
        # why each retried task failed before it succeeded: shard name (or "final task") -> reasons
        "retry_reasons": {k: list(v) for k, v in retry_reasons.items() if v},
        "timings": dict(timings),
        "cluster": dict(publication.cluster),
    }
