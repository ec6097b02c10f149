"""lora-merge's own merge without Ray: the worker and the final task's pieces called in turn in
this process, as the tests of the numerics compare it with PEFT."""

from __future__ import annotations

import os

import torch

from merge_core.inputs.adapter import load_adapter
from merge_core.inputs.checkpoint import load_base
from merge_core.io.registry import open_storage
from merge_core.planning.planner import plan_merge
from merge_core.publish.finalize import build_index, copy_extra_files, publish, validate_merge
from merge_core.publish.journal import write_journal
from merge_core.publish.manifest import adapter_record, build_manifest
from merge_core.publish.report import build_report
from merge_core.worker.shard_merge import merge_shard
from merge_core.worker.spec import MergeSpec
from tests.reference import load_checkpoint


def merge_without_ray(base: str, adapters: list[str], out: str, weights: list[float] | None = None,
                      **options) -> dict[str, torch.Tensor]:
    """The worker and the final task's pieces (validation included), called in turn in this process.
    `options` go to the plan (sequential, combine, dequantize, unmerge,
    original: the original base an unmerge restores DoRA and copies from)."""
    checkpoint = load_base(open_storage(base))
    loaded = [load_adapter(open_storage(a)) for a in adapters]
    weights = weights or [1.0] * len(adapters)
    plan = plan_merge(checkpoint, loaded, weights,
                      sequential=options.get("sequential", False), combine=options.get("combine"),
                      dequantize=options.get("dequantize", False), unmerge=options.get("unmerge", False),
                      restorable=bool(options.get("original")))
    spec = MergeSpec.of(plan, out, original_uri=options.get("original"))
    results = [merge_shard(task, spec) for task in plan.tasks]
    assert sorted(os.listdir(out)) == sorted(t.output_name for t in plan.tasks), "finished shards, no temp files"
    index = build_index(plan, checkpoint.index_metadata)[0]
    validate_merge(plan, results, index, open_storage(base), [open_storage(a) for a in adapters], open_storage(out))
    copied = copy_extra_files(plan, open_storage(base), open_storage(out), checkpoint.extra_files)
    manifest = build_manifest(plan, [adapter_record(a, w, []) for a, w in zip(loaded, weights)], results, copied,
                              index["metadata"]["total_size"], {}, {})
    write_journal(open_storage(out), "merged without Ray", results)  # the driver's record, which publish checks
    publish(open_storage(out), plan, index, manifest, build_report(plan, results))
    return load_checkpoint(out)
