"""What a merge changed, as a reader of a transformer sees it: merge_report.parquet and the
manifest turned into grids (layers down, modules across) and a short summary. Torch-free and
matplotlib-free: merge_core.publish.report_plot draws the grids; the CLI prints the summary.

Grid cells (Grid.values): NaN where the model has no such tensor, 0 where it has one the merge did
not change, inf where a measurement is inf or NaN, else the value. Grid.states says the same in words.
"""

from __future__ import annotations

import io
import math
import statistics
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from merge_core.errors import InputError
from merge_core.names import REPORT_NAME

LAYER_WORDS = {"layers", "layer", "h", "blocks", "block"}
ATTENTION = {
    "q": {"q_proj", "q", "query", "wq", "q_a_proj", "q_b_proj"}, "k": {"k_proj", "k", "key", "wk"},
    "v": {"v_proj", "v", "value", "wv"},
    "qkv": {"c_attn", "qkv_proj", "qkv", "query_key_value", "Wqkv", "wqkv"},
    "kv": {"kv_proj", "kv_a_proj_with_mqa", "kv_b_proj"},
    "o": {"o_proj", "o", "out_proj", "c_proj", "dense", "wo", "proj"},
}
MLP = {
    "gate": {"gate_proj", "w1", "wi_0"}, "up": {"up_proj", "c_fc", "fc1", "w3", "dense_h_to_4h", "wi", "wi_1"},
    "gate_up": {"gate_up_proj"}, "down": {"down_proj", "c_proj", "fc2", "w2", "dense_4h_to_h", "wo"},
    "router": {"gate", "router"},
}
MODULE_ORDER = ("q", "k", "v", "qkv", "kv", "o", "gate", "up", "gate_up", "down", "router", "experts", "shared",
                "embeddings", "head", "other")
# Checked before embeddings: GPT-NeoX calls its head embed_out.
HEAD_WORDS = {"lm_head", "embed_out", "output", "score", "classifier"}
EMBED_ROW, FINAL_ROW = "embed", "final"  # rows for tensors outside the layers: before them, after them
LOST_BELOW = 0.5  # adapter_kept under this: requantization lost most of the adapter's update


@dataclass(frozen=True)
class Place:
    """Where a tensor sits: stack (the layers' prefix), layer (None outside the layers), module (a
    column of MODULE_ORDER), unit (tensors of one unit are measured together: a module's weight and
    bias, one expert's projections)."""
    stack: str
    layer: int | None
    module: str
    unit: str


def place(name: str) -> Place:
    parts = name.split(".")
    at = next((i for i in range(len(parts) - 2) if parts[i] in LAYER_WORDS and parts[i + 1].isdigit()), None)
    if at is None:
        return Place("", None, _outside_module(parts), ".".join(parts[:-1]))
    stack, rest = ".".join(parts[:at]), parts[at + 2:]
    for i, part in enumerate(rest):
        if part == "experts":  # the routed experts: one unit per expert, or one for a fused 3-D block
            expert = rest[i + 1] if i + 1 < len(rest) and rest[i + 1].isdigit() else "all"
            return Place(stack, int(parts[at + 1]), "experts", expert)
        if part.startswith("shared_expert"):
            return Place(stack, int(parts[at + 1]), "shared", "shared")
    # Biases fold into their module's unit: lora_bias changes a bias beside its weight.
    module_path = rest[:-1] if len(rest) > 1 else rest
    attention = any("attn" in p.lower() or "attention" in p.lower() for p in module_path[:-1])
    table = ATTENTION if attention else MLP
    module = next((m for m, names in table.items() if module_path[-1] in names), "other")
    return Place(stack, int(parts[at + 1]), module, ".".join(module_path))


def _outside_module(parts: Sequence[str]) -> str:
    if any(p in HEAD_WORDS for p in parts):
        return "head"
    if any("embed" in p or p in ("wte", "wpe", "shared") for p in parts):
        return "embeddings"
    return "other"


@dataclass(frozen=True, kw_only=True)
class Tensor:
    """One row of the report, with its place. The last three are None where the report lacks them."""
    name: str
    shape: tuple[int, ...]
    row: str
    place: Place
    fused: bool
    adapters: tuple[str, ...]
    delta_norm: float | None
    delta_max_abs: float | None
    relative_change: float | None
    adapter_delta_norms: tuple[float, ...] | None
    adapter_kept: float | None
    requant_error: float | None

    def weight_norm(self) -> float | None:
        """‖W‖, recovered from ‖ΔW‖ / (‖ΔW‖/‖W‖); unknown where ΔW is 0 or a number is not finite."""
        dn, rc = self.delta_norm, self.relative_change
        if not self.fused or dn is None or rc is None or not math.isfinite(dn) or dn == 0 or math.isnan(rc):
            return None
        return 0.0 if math.isinf(rc) else dn / rc

    def delta_of(self, adapter: str | None) -> float:
        """‖ΔW‖ of one adapter (its weighted share), or of all with None."""
        if not self.fused:
            return 0.0
        if adapter is None:
            return self.delta_norm if self.delta_norm is not None else math.nan
        if adapter not in self.adapters:
            return 0.0
        if self.adapter_delta_norms:
            return self.adapter_delta_norms[self.adapters.index(adapter)]
        return self.delta_of(None) if len(self.adapters) == 1 else math.nan


@dataclass(frozen=True, kw_only=True)
class Grid:
    title: str
    kind: str  # "relative_change" (‖ΔW‖/‖W‖) or "adapter_kept" (0..1)
    layers: tuple[str, ...]  # rows, top to bottom
    modules: tuple[str, ...]  # columns
    values: tuple[tuple[float, ...], ...]  # mean over the cell's units (see the module's docstring)
    extreme: tuple[tuple[float, ...], ...]  # over the cell's units: the largest change, the least kept
    states: tuple[tuple[str, ...], ...]  # absent, unchanged, changed, nonfinite

    def cell(self, layer: str, module: str) -> float:
        return self.values[self.layers.index(layer)][self.modules.index(module)]


@dataclass(frozen=True)
class Adapter:
    uri: str
    peft_type: str
    rank: str
    weight: float


@dataclass(frozen=True, kw_only=True)
class ReportView:
    model: str
    created: str  # the merge's date, YYYY-MM-DD
    adapters: tuple[Adapter, ...]
    arithmetic: Mapping[str, object]
    tensors: tuple[Tensor, ...]
    grids: tuple[Grid, ...]  # relative change: one per adapter where the report splits ‖ΔW‖ by adapter
    kept: Grid | None  # quantized bases: the adapter's share that survived requantization


def load_view(report: bytes, manifest: Mapping, config: Mapping | None = None) -> ReportView:
    """The view of a merged model from its merge_report.parquet bytes, merge_manifest.json and
    config.json (optional: names the model where the base URI does not)."""
    rows = _read_rows(report)
    stacks = list(dict.fromkeys(place(r["name"]).stack for r in rows if place(r["name"]).layer is not None))
    labels = _stack_labels(stacks)
    tensors = tuple(_tensor(r, labels) for r in rows)
    adapters = tuple(_adapter(a) for a in manifest.get("adapters", ()))
    split = len(adapters) > 1 and any(t.adapter_delta_norms for t in tensors)
    grids = tuple(_relative_grid(tensors, a.uri, f"‖ΔW‖/‖W‖ of {_short(a.uri)}") for a in adapters) if split \
        else (_relative_grid(tensors, None, "‖ΔW‖/‖W‖"),)
    kept = _kept_grid(tensors) if any(t.adapter_kept is not None for t in tensors) else None
    return ReportView(model=_model_name(manifest, config or {}), created=str(manifest.get("created", ""))[:10],
                      adapters=adapters, arithmetic=dict(manifest.get("arithmetic") or {}), tensors=tensors,
                      grids=grids, kept=kept)


def _read_rows(report: bytes) -> list[dict]:
    try:
        table = pq.read_table(io.BytesIO(report))
    except (pa.ArrowException, OSError) as exc:
        raise InputError(REPORT_NAME, f"cannot be read as Parquet ({exc})", "re-run the merge to rewrite it")
    missing = {"name", "fused", "adapters", "delta_norm", "relative_change"} - set(table.column_names)
    if missing:
        raise InputError(REPORT_NAME, f"lacks the columns {sorted(missing)}", "re-run the merge with this version")
    return table.to_pylist()


def _tensor(row: Mapping, stack_labels: Mapping[str, str]) -> Tensor:
    where = place(row["name"])
    if where.layer is None:
        label = EMBED_ROW if where.module == "embeddings" else FINAL_ROW
    else:
        label = f"{stack_labels[where.stack]}{where.layer}"
    norms = row.get("adapter_delta_norms")
    return Tensor(name=row["name"], shape=tuple(row.get("shape") or ()), row=label, place=where,
                  fused=bool(row["fused"]), adapters=tuple(row["adapters"] or ()), delta_norm=row["delta_norm"],
                  delta_max_abs=row.get("delta_max_abs"), relative_change=row["relative_change"],
                  adapter_delta_norms=tuple(norms) if norms else None, adapter_kept=row.get("adapter_kept"),
                  requant_error=row.get("requant_error"))


def _stack_labels(stacks: Sequence[str]) -> dict[str, str]:
    """Row label prefixes: none for one stack of layers; for several (a vision tower beside the
    language model), what tells their prefixes apart."""
    if len(stacks) < 2:
        return {s: "" for s in stacks}
    split = [s.split(".") for s in stacks]
    common = 0
    while all(len(p) > common + 1 and p[common] == split[0][common] for p in split):
        common += 1
    return {s: ".".join(p[common:]) + "." for s, p in zip(stacks, split)}


def _adapter(record: Mapping) -> Adapter:
    config = record.get("config") or {}
    rank = str(config.get("r", "-")) + (" (varies by module)" if config.get("rank_pattern") else "")
    return Adapter(str(record.get("uri", "?")), str(record.get("peft_type") or config.get("peft_type") or "?"),
                   rank, float(record.get("weight", 1.0)))


def _model_name(manifest: Mapping, config: Mapping) -> str:
    uri = str((manifest.get("base") or {}).get("uri") or "").rstrip("/")
    return _short(uri) or _short(str(config.get("_name_or_path") or "")) or str(config.get("model_type") or "model")


def _short(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _layout(tensors: Sequence[Tensor]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    # Layers in order within each stack, stacks in the order the report meets them.
    layered = [t for t in tensors if t.place.layer is not None]
    order = {s: i for i, s in enumerate(dict.fromkeys(t.place.stack for t in layered))}
    keys = {t.row: (order[t.place.stack], t.place.layer) for t in layered}
    rows = sorted(keys, key=keys.__getitem__)
    present = {t.row for t in tensors}
    rows = [EMBED_ROW] * (EMBED_ROW in present) + rows + [FINAL_ROW] * (FINAL_ROW in present)
    modules = {t.place.module for t in tensors}
    return tuple(rows), tuple(m for m in MODULE_ORDER if m in modules)


def _grid(tensors: Sequence[Tensor], title: str, kind: str,
          unit_value: Callable[[Sequence[Tensor]], float | None]) -> Grid:
    """unit_value: a unit's value, None where the merge did not change it."""
    layers, modules = _layout(tensors)
    units: dict[tuple[str, str], dict[str, list[Tensor]]] = {}
    for t in tensors:
        units.setdefault((t.row, t.place.module), {}).setdefault(t.place.unit, []).append(t)
    values, extreme, states = [], [], []
    for layer in layers:
        cells = [_cell(units.get((layer, m)), unit_value, kind) for m in modules]
        values.append(tuple(c[0] for c in cells))
        extreme.append(tuple(c[1] for c in cells))
        states.append(tuple(c[2] for c in cells))
    return Grid(title=title, kind=kind, layers=layers, modules=modules, values=tuple(values), extreme=tuple(extreme),
                states=tuple(states))


def _cell(units: Mapping[str, list[Tensor]] | None, unit_value, kind: str) -> tuple[float, float, str]:
    if not units:
        return math.nan, math.nan, "absent"
    changed = [v for v in (unit_value(ts) for ts in units.values()) if v is not None]
    if not changed:
        return 0.0, 0.0, "unchanged"
    if not all(math.isfinite(v) for v in changed):
        return math.inf, math.inf, "nonfinite"
    return statistics.fmean(changed), (min if kind == "adapter_kept" else max)(changed), "changed"


def _relative_grid(tensors: Sequence[Tensor], adapter: str | None, title: str) -> Grid:
    def unit_value(unit: Sequence[Tensor]) -> float | None:
        # A unit's tensors as one vector: ‖ΔW‖ over the ‖W‖ of the tensors the merge touched.
        touched = [(t, d) for t, d in ((t, t.delta_of(adapter)) for t in unit) if d != 0]  # NaN included
        if not touched:
            return None
        if not all(math.isfinite(d) and math.isfinite(t.relative_change or 0.0) for t, d in touched):
            return math.inf
        weight = math.sqrt(sum((t.weight_norm() or 0.0) ** 2 for t, _ in touched))
        return math.sqrt(sum(d * d for _, d in touched)) / weight if weight else math.inf
    return _grid(tensors, title, "relative_change", unit_value)


def _kept_grid(tensors: Sequence[Tensor]) -> Grid:
    def unit_value(unit: Sequence[Tensor]) -> float | None:
        # Weighted by ‖ΔW‖: the share of the unit's update that survived, big tensors counting more.
        kept = [(t.adapter_kept, t.delta_norm) for t in unit if t.adapter_kept is not None and t.delta_norm]
        if not kept:
            return None
        total = sum(d for _, d in kept)
        return sum(k * d for k, d in kept) / total if math.isfinite(total) and total else math.inf
    return _grid(tensors, "adapter kept after requantization", "adapter_kept", unit_value)


def top_tensors(view: ReportView, count: int = 20) -> list[Tensor]:
    """The fused tensors the merge changed most, relative to their weight (non-finite first)."""
    def key(t: Tensor) -> float:
        rc = t.relative_change
        return math.inf if rc is None or math.isnan(rc) else rc
    return sorted((t for t in view.tensors if t.fused), key=key, reverse=True)[:count]
