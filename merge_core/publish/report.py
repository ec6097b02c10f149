"""merge_report.parquet: one row per output tensor, saying what the merge did to it."""

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
])


def build_report(plan: MergePlan, results: Sequence[ShardResult]) -> bytes:
    stats = {name: s for r in results for name, s in r.fused_stats}
    rows = []
    for task in plan.tasks:
        targets = {t.tensor: t for t in task.targets}
        for name, dtype, shape in task.output_tensors:
            target, stat = targets.get(name), stats.get(name)
            rows.append({
                "name": name, "shard": task.name, "dtype": dtype, "shape": list(shape),
                "fused": target is not None,
                "adapters": [plan.adapter_uris[u.adapter] for u in target.updates] if target else [],
                "scales": [u.scale for u in target.updates] if target else [],
                "delta_norm": stat.delta_norm if stat else None,
                "delta_max_abs": stat.delta_max if stat else None,
                "relative_change": (stat.delta_norm / stat.weight_norm if stat.weight_norm else float("inf"))
                if stat else None,
            })
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), buffer)
    return buffer.getvalue()
