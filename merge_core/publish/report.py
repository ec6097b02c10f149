"""merge_report.parquet: one row per tensor of the merged model (a quantized weight's stored parts as one
row, under its logical name), saying what the merge did to it."""

from __future__ import annotations

import io
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from merge_core.planning.plan import MergePlan
from merge_core.worker.shard_result import ShardResult

SCHEMA = pa.schema([
    ("name", pa.string()),
    ("shard", pa.string()),
    ("dtype", pa.string()),
    ("shape", pa.list_(pa.int64())),
    ("fused", pa.bool_()),
    ("adapters", pa.list_(pa.string())),
    ("scales", pa.list_(pa.float64())),  # per adapter: its LoRA scale times its --weight
    ("delta_norm", pa.float64()),  # ‖ΔW‖ (Frobenius, float32 ΔW before rounding)
    ("delta_max_abs", pa.float64()),  # max |ΔW|
    ("relative_change", pa.float64()),  # ‖ΔW‖ / ‖W‖
    ("stored_as", pa.list_(pa.string())),  # a quantized weight's stored tensors (codes, scales), else empty
    ("codec", pa.string()),  # a codec of format/codecs (fp8_block, ct_nvfp4, ...); "" when not quantized
    ("requant_error", pa.float64()),  # ‖deq(Q(W')) − W'‖ / ‖ΔW‖: what storing W' in its format cost
    ("adapter_kept", pa.float64()),  # cos(deq(Q(W')) − deq(W), ΔW): the share of the adapter that survived
    ("adapter_delta_norms", pa.list_(pa.float64())),  # per adapter in `adapters`: ‖its weighted ΔW‖ (several)
])


def _rows(task) -> list[tuple[str, str, tuple[int, ...], object]]:
    """(name, dtype, shape, target or None) per tensor of the merged shard, a quantized weight's parts
    folded into one row; fused siblings (merged together) each a row of their own."""
    targets = {t.tensor: t for t in task.targets if t.quantized is None}
    owners = {name: member for t in task.targets if t.quantized is not None for member in t.members
              for name, _, _ in member.output_tensors}
    rows, seen = [], set()
    for name, dtype, shape in task.output_tensors:
        owner = owners.get(name)
        if owner is None:
            rows.append((name, dtype, tuple(shape), targets.get(name)))
        elif owner.tensor not in seen:
            seen.add(owner.tensor)
            rows.append((owner.tensor, owner.output_tensors[0][1], owner.quantized.shape, owner))
    return rows


def _fused(target) -> bool:
    """Whether the merge computed the tensor: not a sibling the adapters leave alone (merged beside one
    they touch, its bytes kept or requantized only for the scale they share)."""
    return target is not None and not (target.quantized is not None and not target.updates and not target.dequantize)


def build_report(plan: MergePlan, results: Sequence[ShardResult]) -> bytes:
    stats = {name: s for r in results for name, s in r.fused_stats}
    rows = []
    for task in plan.tasks:
        for name, dtype, shape, target in _rows(task):
            stat = stats.get(name)
            quantized = target.quantized if target is not None else None
            rows.append({
                "name": name, "shard": task.name, "dtype": dtype, "shape": list(shape),
                "fused": _fused(target),
                "adapters": [plan.adapter_uris[u.adapter] for u in target.updates] if target else [],
                "scales": [u.scale for u in target.updates] if target else [],
                "delta_norm": stat.delta_norm if stat else None,
                "delta_max_abs": stat.delta_max if stat else None,
                "relative_change": (stat.delta_norm / stat.weight_norm if stat.weight_norm else float("inf"))
                if stat else None,
                "stored_as": [n for n, _, _ in target.output_tensors] if quantized else [],
                "codec": quantized.codec if quantized else "",
                "requant_error": stat.requant_error if stat else None,
                "adapter_kept": stat.adapter_kept if stat else None,
                "adapter_delta_norms": list(stat.adapter_norms) if stat else [],
            })
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), buffer)
    return buffer.getvalue()
