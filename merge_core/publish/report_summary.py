"""The report's summary for a terminal: the adapters and what they touched, the layers changed
most and least, anything non-finite, and (quantized bases) where requantization lost the update."""

from __future__ import annotations

import math
import statistics
from typing import Sequence

from merge_core.publish.report_view import EMBED_ROW, FINAL_ROW, LOST_BELOW, MODULE_ORDER, ReportView, Tensor


def summary_text(view: ReportView, most: int = 3) -> str:
    """A few lines for a terminal: the adapters and what they touched, the layers changed most and
    least, anything non-finite, and (quantized bases) where requantization lost the update."""
    fused = [t for t in view.tensors if t.fused]
    arithmetic = ", ".join(f"{k} {v}" for k, v in view.arithmetic.items() if v is not None)
    lines = [f"{view.model}: merged {view.created or '(date unknown)'}, {len(fused)} of {len(view.tensors)} "
             f"tensors fused" + (f" ({arithmetic})" if arithmetic else "")]
    for a in view.adapters:
        mine = [t for t in fused if a.uri in t.adapters]
        modules = [m for m in MODULE_ORDER if any(t.place.module == m for t in mine)]
        layers = list(dict.fromkeys(t.row for t in mine if t.place.layer is not None))
        where = f", {'layers' if len(layers) > 1 else 'layer'} {_ranges(layers)}" if layers else ""
        lines.append(f"  {a.uri}: {a.peft_type}, rank {a.rank}, weight {a.weight:g}; touched "
                     f"{', '.join(modules) or 'nothing'} ({_plural(len(mine), 'tensor')}{where})")
    lines += _layer_lines(view, most) + _nonfinite_lines(fused) + _kept_lines(fused)
    return "\n".join(lines)


def layer_means(view: ReportView) -> dict[str, float]:
    """Each layer's mean ‖ΔW‖/‖W‖ over its fused tensors with finite numbers, in layer order."""
    by_row: dict[str, list[float]] = {}
    for t in view.tensors:
        if t.fused and t.place.layer is not None and t.relative_change is not None \
                and math.isfinite(t.relative_change):
            by_row.setdefault(t.row, []).append(t.relative_change)
    return {row: statistics.fmean(by_row[row]) for row in view.grids[0].layers if row in by_row}


def _layer_lines(view: ReportView, most: int) -> list[str]:
    means = layer_means(view)
    if not means:
        return ["no layer changed"]
    ranked = sorted(means, key=means.__getitem__, reverse=True)
    shown = max(1, min(most, len(ranked) // 2))
    lines = ["changed most (mean ‖ΔW‖/‖W‖ of a layer's fused tensors): "
             + "; ".join(f"layer {r}: {means[r]:.3g}" for r in ranked[:shown])]
    if len(ranked) > 1:
        lines.append("changed least: " + "; ".join(f"layer {r}: {means[r]:.3g}" for r in ranked[::-1][:shown]))
    fused_rows = {t.row for t in view.tensors if t.fused}
    untouched = [r for r in view.grids[0].layers if r not in fused_rows and r not in (EMBED_ROW, FINAL_ROW)]
    if untouched:
        lines.append(f"layers left unchanged: {_ranges(untouched)}")
    return lines


def _nonfinite_lines(fused: Sequence[Tensor], named: int = 5) -> list[str]:
    bad = [t for t in fused if not all(v is None or math.isfinite(v) for v in (t.relative_change, t.delta_norm))]
    if not bad:
        return ["non-finite: none"]
    shown = ", ".join(f"{t.name} (‖ΔW‖ {t.delta_norm}, ‖ΔW‖/‖W‖ {t.relative_change}"
                      + (": ‖W‖ is 0)" if t.delta_norm is not None and math.isfinite(t.delta_norm) else ")")
                      for t in bad[:named])
    return [f"non-finite: {_plural(len(bad), 'tensor')}: {shown}" + (", ..." if len(bad) > named else "")]


def _kept_lines(fused: Sequence[Tensor], named: int = 5) -> list[str]:
    measured = [t for t in fused if t.adapter_kept is not None]
    if not measured:
        return []
    lost = sorted((t for t in measured if not t.adapter_kept >= LOST_BELOW), key=lambda t: (
        not math.isnan(t.adapter_kept), t.adapter_kept))  # NaN first: nothing is known of what was kept
    line = (f"requantization kept a median {statistics.median(t.adapter_kept for t in measured):.2f} of the "
            f"adapter's update; lost (kept < {LOST_BELOW}) in {len(lost)} of {len(measured)} tensors")
    if lost:
        line += ", worst: " + ", ".join(
            f"{t.name} ({t.adapter_kept:.2f}" + (f", requant error {t.requant_error:.3g})" if t.requant_error
                                                 is not None else ")") for t in lost[:named])
    return [line]


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("s" if count != 1 else "")


def _ranges(labels) -> str:
    """'0-3, 7' for numeric layer labels; the labels as they are otherwise."""
    labels = list(labels)
    if not all(label.isdigit() for label in labels):
        return ", ".join(labels)
    numbers, spans = sorted(int(label) for label in labels), []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
