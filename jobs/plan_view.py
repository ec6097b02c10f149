"""`lora-merge plan`: what a merge would do, from headers alone. Writes nothing, starts no Ray."""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.driver import prepare
from jobs.options import MergeInputs
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
    quantization = describe_quantization(prepared.base)
    data = plan_as_dict(prepared.plan, inputs.device, quantization)
    return PlanSummary(base=data["base"], adapters=tuple(data["adapters"]), operation=data["operation"],
                       shards=data["tasks"], fused_tensors=data["fused_tensors"], read_bytes=data["read_bytes"],
                       write_bytes=data["write_bytes"], quantization=quantization,
                       text=render_plan(prepared.plan, inputs.device, quantization), data=data)
