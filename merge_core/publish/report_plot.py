"""Pictures of what a merge changed: a PNG heatmap of merge_core.publish.report_view's grids, and
one self-contained HTML page (the PNG inline, the summary, the most-changed tensors).

matplotlib is an optional extra ("lora-merge[plot]"), imported only when a picture is asked for.
Figures are drawn on their own Agg canvas, never through pyplot: no screen, no global backend switch
in the caller's process.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Sequence

from merge_core.errors import InputError
from merge_core.publish.report_view import EMBED_ROW, FINAL_ROW, Grid, ReportView, top_tensors

WIDTH_INCHES, DPI = 10, 100  # 1000 px wide: readable in a browser, small in a bucket
UNCHANGED = (0.82, 0.82, 0.82, 1.0)  # light grey: the tensor is there, the merge left it alone
ABSENT = (1.0, 1.0, 1.0, 1.0)  # white: the model has no such tensor
NONFINITE = (1.0, 0.0, 1.0, 1.0)  # magenta: inf or NaN, never a colour of either scale
MOST_Y_LABELS = 40


def require_matplotlib(flag: str):
    try:
        import matplotlib  # noqa: F401  (first: a missing package fails here, not on a submodule)
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError(flag, "needs matplotlib, which is not installed", "pip install 'lora-merge[plot]'") from None
    return Figure


def relative_norm(grids: Sequence[Grid]):
    """One log scale for every relative-change panel, so that adapters compare by colour."""
    from matplotlib.colors import LogNorm
    finite = [v for g in grids for row, states in zip(g.values, g.states) for v, s in zip(row, states)
              if s == "changed"]
    low, high = (min(finite), max(finite)) if finite else (1e-3, 1.0)
    return LogNorm(vmin=low if low < high else high / 10, vmax=high)


def cell_colours(grid: Grid, norm, cmap) -> list[list[tuple[float, float, float, float]]]:
    """The RGBA of each cell as drawn: the scale's colour where changed, else the state's colour."""
    fixed = {"unchanged": UNCHANGED, "absent": ABSENT, "nonfinite": NONFINITE}
    return [[fixed[s] if s in fixed else tuple(float(c) for c in cmap(norm(v)))
             for v, s in zip(row, states)] for row, states in zip(grid.values, grid.states)]


def figure(view: ReportView, flag: str = "--png"):
    """The heatmap figure: one panel per relative-change grid, then the requantization panel."""
    Figure = require_matplotlib(flag)
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    panels = [*view.grids, *([view.kept] if view.kept else [])]
    columns = min(len(panels), 3)
    rows = math.ceil(len(panels) / columns)
    panel_height = min(max(0.2 * len(panels[0].layers) + 1.8, 3.2), 14.0)
    fig = Figure(figsize=(WIDTH_INCHES, rows * panel_height + 1.0), dpi=DPI, layout="constrained")
    axes = [fig.add_subplot(rows, columns, i + 1) for i in range(len(panels))]
    scales = {"relative_change": (relative_norm(view.grids), colormaps["viridis"]),
              "adapter_kept": (Normalize(0.0, 1.0, clip=True), colormaps["RdYlGn"])}
    for ax, grid in zip(axes, panels):
        _panel(ax, grid, *scales[grid.kind])
    relative_axes = [ax for ax, g in zip(axes, panels) if g.kind == "relative_change"]
    fig.colorbar(ScalarMappable(*scales["relative_change"]), ax=relative_axes, label="‖ΔW‖/‖W‖ (log scale)",
                 shrink=0.9)
    if view.kept:
        fig.colorbar(ScalarMappable(*scales["adapter_kept"]), ax=axes[-1], label="share of ΔW kept", shrink=0.9)
    fig.suptitle(_title(view))
    _legend(fig)
    return fig


def _panel(ax, grid: Grid, norm, cmap) -> None:
    ax.imshow(cell_colours(grid, norm, cmap), aspect="auto", interpolation="nearest")
    ax.set_title(grid.title, fontsize=10)
    ax.set_xticks(range(len(grid.modules)), grid.modules, rotation=45, ha="right", fontsize=8)
    step = max(1, math.ceil(len(grid.layers) / MOST_Y_LABELS))  # a label per layer would overlap at 80 layers
    shown = sorted({*range(0, len(grid.layers), step), *(i for i, label in enumerate(grid.layers)
                                                          if label in (EMBED_ROW, FINAL_ROW))})
    ax.set_yticks(shown, [grid.layers[i] for i in shown], fontsize=8)
    ax.set_ylabel("layer")
    # Thin white rules between cells, so that neighbouring cells of one colour stay countable.
    ax.set_xticks([x - 0.5 for x in range(1, len(grid.modules))], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, len(grid.layers))], minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="minor", length=0)


def _legend(fig) -> None:
    from matplotlib.patches import Patch
    handles = [Patch(facecolor=UNCHANGED, label="unchanged"),
               Patch(facecolor=ABSENT, edgecolor="0.6", label="no such tensor"),
               Patch(facecolor=NONFINITE, label="inf or NaN")]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8, frameon=False)


def _title(view: ReportView, most: int = 3) -> str:
    names = [a.uri.rstrip("/").rsplit("/", 1)[-1] for a in view.adapters]
    shown = ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
    return f"{view.model} + {shown or 'no adapters'}" + (f", merged {view.created}" if view.created else "")


def png_bytes(view: ReportView, flag: str = "--png") -> bytes:
    fig = figure(view, flag)  # first: without matplotlib, the InputError that says how to install it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def html_bytes(view: ReportView, summary: str, flag: str = "--html", top: int = 20) -> bytes:
    """One page with no external assets: it opens from a laptop, a bucket or an e-mail."""
    image = base64.b64encode(png_bytes(view, flag)).decode("ascii")
    title = html.escape(_title(view))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} img{{max-width:100%}}
pre{{background:#f6f6f6;padding:1em;white-space:pre-wrap}} table{{border-collapse:collapse;font-size:0.9em}}
td,th{{border:1px solid #ccc;padding:0.2em 0.5em;text-align:right}} td:first-child{{text-align:left}}</style>
</head><body><h1>{title}</h1>
<img alt="‖ΔW‖/‖W‖ by layer and module" src="data:image/png;base64,{image}">
<h2>Summary</h2><pre>{html.escape(summary)}</pre>
<h2>Most changed tensors</h2>{_table(view, top)}
</body></html>
""".encode("utf-8")


def _table(view: ReportView, top: int) -> str:
    kept = view.kept is not None
    head = ["tensor", "layer", "module", "shape", "‖ΔW‖/‖W‖", "‖ΔW‖", "max |ΔW|", "adapters"] + ["kept"] * kept
    lines = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for t in top_tensors(view, top):
        cells = [t.name, t.row, t.place.module, "×".join(map(str, t.shape)), _number(t.relative_change),
                 _number(t.delta_norm), _number(t.delta_max_abs),
                 ", ".join(a.rstrip("/").rsplit("/", 1)[-1] for a in t.adapters)] + [_number(t.adapter_kept)] * kept
        lines.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return "\n".join(lines + ["</table>"])


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
