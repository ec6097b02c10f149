"""`lora-merge plan`: what a merge would do, from headers alone. Writes nothing, starts no Ray."""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.options import MergeInputs
from jobs.prepare import prepare
from jobs.progress import plural, size_text
from jobs.scheduling import TASKS_PER_GPU
from merge_core.format.codecs import describe
from merge_core.inputs.checkpoint import BaseCheckpoint
from merge_core.planning.plan import MergePlan


def plan_as_dict(plan: MergePlan, device: str, quantization: str | None = None) -> dict:
    gpus = 1 / TASKS_PER_GPU if device == "cuda" else 0
    return {
        "base": plan.base_uri,
        "adapters": list(plan.adapter_uris),
        "tasks": len(plan.tasks),
        "fused_tensors": plan.fused_tensor_count,
        "read_bytes": plan.read_bytes,
        "write_bytes": plan.write_bytes,
        "operation": "unmerge" if plan.arithmetic.unmerge else "merge",
        "model_changes": plan.model_changes,
        "quantization": quantization,
        "scales": plan.scales if quantization else None,
        "shards": [{
            "name": t.name,
            "size": t.shard.size,
            "tensors": len(t.output_tensors),
            "fused": {uri: [f.tensor for f in t.targets if any(u.adapter == i for u in f.updates)]
                      for i, uri in enumerate(plan.adapter_uris)},
            "read_bytes": t.read_bytes,
            # quantized weights decoded, fused and encoded again in their format, or written as bf16
            "requantized": [m.tensor for f in t.targets if f.quantized is not None and not f.dequantize
                            for m in f.members],
            "dequantized": [f.tensor for f in t.targets if f.quantized is not None and f.dequantize],
            "resources": {"num_cpus": 1, "num_gpus": gpus, "memory": t.memory_bytes},
        } for t in plan.tasks],
    }


def render_plan(plan: MergePlan, device: str, quantization: str | None = None) -> str:
    data = plan_as_dict(plan, device, quantization)
    stored = f" ({quantization})" if quantization else ""
    lines = [f"base {data['base']}{stored}: {plural(data['tasks'], 'shard')}, "
             f"{plural(data['fused_tensors'], 'tensor')} to fuse, read {size_text(data['read_bytes'])}, "
             f"write {size_text(data['write_bytes'])}",
             f"{'shard':<44} {'size':>10} {'tensors':>7} {'fused':>5} {'memory':>10}  adapters touching it"]
    for shard in data["shards"]:
        touching = ", ".join(f"{uri} ({len(names)})" for uri, names in shard["fused"].items() if names) or "-"
        lines.append(f"{shard['name']:<44} {size_text(shard['size']):>10} {shard['tensors']:7d} "
                     f"{sum(len(v) for v in shard['fused'].values()):5d} "
                     f"{size_text(shard['resources']['memory']):>10}  {touching}")
    for shard in data["shards"]:
        kept = "keeping the base's scales" if plan.scales == "keep" else "with fresh scales"
        for verb, key in ((f"requantizes ({kept})", "requantized"), ("dequantizes to bf16", "dequantized")):
            if shard[key]:
                shown = ", ".join(shard[key][:3]) + (f" and {len(shard[key]) - 3} more" if len(shard[key]) > 3 else "")
                lines.append(f"{shard['name']}: {verb} {len(shard[key])} quantized weights ({shown})")
    if plan.arithmetic.unmerge:
        lines.insert(1, "unmerges the adapters from this merged model: each update subtracted as PEFT's "
                     "unmerge_adapter() does, the last adapter first")
    changes = data["model_changes"]
    for name, (old, new) in changes["resized_tensors"].items():
        lines.append(f"resizes {name} from {old} to {new}")
    for name, source in changes["added_tensors"].items():
        lines.append(f"adds {name} (untied from {source})")
    if changes["config"]:
        shown = [f"{key}.vocab_size={value['vocab_size']}" if isinstance(value, dict) else f"{key}={value}"
                 for key, value in changes["config"].items()]
        lines.append(f"rewrites config.json: {', '.join(shown)}")
    if changes["config_removed"]:
        lines.append(f"removes {', '.join(changes['config_removed'])} from config.json")
    for name, source in changes["files_from_adapters"].items():
        lines.append(f"takes {name} from {source}")
    if changes["base_files_left_out"]:
        lines.append(f"leaves out the base's {', '.join(changes['base_files_left_out'])} (the adapter's tokenizer "
                     "replaces the base's; --dequantize drops the files that declare a quantized format)")
    share = f"1/{TASKS_PER_GPU} of a GPU"
    gpu = share if device == "cuda" else f"{share} where the cluster has GPUs" if device == "auto" else "no GPU"
    lines.append(f"each task asks Ray for 1 CPU, {gpu}, and the memory shown")
    return "\n".join(lines)


def describe_quantization(base: BaseCheckpoint) -> str | None:
    """The base's format as a user names it, e.g. 'fp8 e4m3, 128×128 blocks: 14 weights'."""
    if base.quantization is None:
        return None
    return f"{describe(base.quantization)}: {len(base.quantized)} quantized weights"


@dataclass(frozen=True, kw_only=True)
class PlanSummary:
    """What a merge would do: the figures `lora-merge plan` prints, the text, and the dict of --json."""
    base: str
    adapters: tuple[str, ...]
    operation: str  # merge or unmerge
    shards: int
    fused_tensors: int
    read_bytes: int
    write_bytes: int
    quantization: str | None
    text: str = field(repr=False)
    data: dict = field(repr=False)  # `lora-merge plan --json`: every shard with what it reads and fuses


def run_plan(inputs: MergeInputs) -> PlanSummary:
    prepared = prepare(inputs)
    return _summary(prepared.plan, inputs.device, describe_quantization(prepared.base))


@dataclass(frozen=True, kw_only=True)
class BatchPlanSummary:
    """What a batch would do: the base read once, each output written (`lora-merge batch --plan`)."""
    base: str
    outputs: tuple[PlanSummary, ...]  # each output's own plan, as `lora-merge plan` shows it
    base_bytes: int
    read_bytes: int  # the base once, and each output's adapters
    separate_read_bytes: int  # what the outputs' own merges would read together
    write_bytes: int
    memory_bytes: int  # the most one shard task asks for
    text: str = field(repr=False)
    data: dict = field(repr=False)


def run_batch_plan(batch) -> BatchPlanSummary:
    """The plan of a batch (jobs.options.BatchOptions), from headers alone: writes nothing, starts no Ray."""
    from jobs.batch_checks import check_batch
    from jobs.options import outputs_of
    from jobs.prepare import check_execution
    from merge_core.inputs.checkpoint import load_base
    from merge_core.io.registry import open_storage
    from merge_core.planning.plan import shared_memory_bytes

    merges = outputs_of(batch)
    check_batch(batch, merges)
    check_execution(batch)
    base = load_base(open_storage(batch.checkpoint, batch.storage))
    plans = [prepare(merge, base=base).plan for merge in merges]
    shard_bytes = sum(s.size for s in base.shards)
    uploads = sum(open_storage(m.output, m.storage).upload_buffer_bytes for m in merges)
    memory = max(shared_memory_bytes([p.tasks[i] for p in plans]) for i in range(len(base.shards))) + uploads
    quantization = describe_quantization(base)
    outputs = tuple(_summary(plan, batch.device, quantization) for plan in plans)
    data = {"base": base.uri, "shards": len(base.shards), "base_bytes": shard_bytes,
            "read_bytes": shard_bytes + sum(p.read_bytes - shard_bytes for p in plans),
            "separate_read_bytes": sum(p.read_bytes for p in plans), "write_bytes": sum(p.write_bytes for p in plans),
            "memory_bytes": memory,
            "outputs": [{"output": m.output} | o.data for m, o in zip(merges, outputs)]}
    return BatchPlanSummary(base=base.uri, outputs=outputs, base_bytes=shard_bytes, read_bytes=data["read_bytes"],
                            separate_read_bytes=data["separate_read_bytes"], write_bytes=data["write_bytes"],
                            memory_bytes=memory, text=_batch_text(data, batch.device), data=data)


def _summary(plan: MergePlan, device: str, quantization: str | None) -> PlanSummary:
    data = plan_as_dict(plan, device, quantization)
    return PlanSummary(base=data["base"], adapters=tuple(data["adapters"]), operation=data["operation"],
                       shards=data["tasks"], fused_tensors=data["fused_tensors"], read_bytes=data["read_bytes"],
                       write_bytes=data["write_bytes"], quantization=quantization,
                       text=render_plan(plan, device, quantization), data=data)


def _batch_text(data: dict, device: str) -> str:
    count = len(data["outputs"])
    lines = [f"base {data['base']}: {plural(data['shards'], 'shard')}, {size_text(data['base_bytes'])}, read once for "
             f"{plural(count, 'output')} ({count} separate merges would read {size_text(data['separate_read_bytes'])})",
             f"{'output':<44} {'fused':>5} {'adapter bytes':>13} {'write':>10}  adapters"]
    for output in data["outputs"]:
        adapters = ", ".join(output["adapters"])
        lines.append(f"{output['output']:<44} {output['fused_tensors']:5d} "
                     f"{size_text(output['read_bytes'] - data['base_bytes']):>13} "
                     f"{size_text(output['write_bytes']):>10}"
                     f"  {adapters}")
    gpu = f"1/{TASKS_PER_GPU} of a GPU" if device == "cuda" else "no GPU" if device == "cpu" else \
        f"1/{TASKS_PER_GPU} of a GPU where the cluster has GPUs"
    lines += [f"in all: read {size_text(data['read_bytes'])} (the base once, and each output's adapters), write "
              f"{size_text(data['write_bytes'])} ({plural(count, 'output')})",
              f"one task per shard writes every output: each asks Ray for 1 CPU, {gpu}, and at most "
              f"{size_text(data['memory_bytes'])} of memory (one base tensor at a time, whatever the number of "
              "outputs)"]
    return "\n".join(lines)
