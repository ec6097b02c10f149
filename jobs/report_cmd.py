"""What a merge changed, from the merged model's own report and manifest (local or S3): the view
`lora-merge report` shows, the picture and page it draws (and `merge --report-png` at the end),
and what a quantized base's stored weights kept of the update."""

from __future__ import annotations

import json
import statistics

from merge_core.errors import InputError
from merge_core.io.registry import open_storage
from merge_core.names import CONFIG_JSON, MANIFEST_NAME, REPORT_NAME
from merge_core.publish.report_view import LOST_BELOW, ReportView, load_view


def read_view(merged_uri: str) -> ReportView:
    merged = open_storage(merged_uri)
    for name in (REPORT_NAME, MANIFEST_NAME):
        if not merged.exists(name):
            raise InputError(merged.describe(name), "not found: this is not the output of a finished lora-merge run",
                             "point at a directory or prefix lora-merge merged into")
    try:
        manifest = json.loads(merged.read_bytes(MANIFEST_NAME))
        config = json.loads(merged.read_bytes(CONFIG_JSON)) if merged.exists(CONFIG_JSON) else None
    except ValueError as exc:
        raise InputError(merged.describe(MANIFEST_NAME), f"not valid JSON ({exc})", "re-run the merge") from None
    return load_view(merged.read_bytes(REPORT_NAME), manifest, config)


def write_to(target: str, data: bytes) -> str:
    """Write `data` to a local path or a URI (s3://bucket/prefix/name); returns where it went."""
    directory, _, name = target.rstrip("/").rpartition("/")
    storage = open_storage(directory or ".")
    storage.write_bytes(name, data)
    return storage.describe(name)


def draw(view: ReportView, png: str | None, html: str | None, summary: str) -> list[str]:
    """The picture and/or the HTML page, each written where asked; returns where they went."""
    from merge_core.publish.report_plot import html_bytes, png_bytes

    written = []
    if png:
        written.append(write_to(png, png_bytes(view, "--png")))
    if html:
        written.append(write_to(html, html_bytes(view, summary, "--html")))
    return written


def survival(view: ReportView, named: int = 3) -> tuple[str | None, str | None]:
    """For a merge into a quantized base: a summary line of what the stored weights kept of the
    adapter's update, and a warning when requantization lost most of it somewhere."""
    measured = [t for t in view.tensors if t.adapter_kept is not None and t.adapter_kept == t.adapter_kept]
    if not measured:
        return None, None
    worst = sorted(measured, key=lambda t: t.adapter_kept)
    line = (f"median {statistics.median(t.adapter_kept for t in measured):.3f}, worst {worst[0].adapter_kept:.3f} "
            f"({worst[0].name}); requantization error up to {max(t.requant_error or 0 for t in measured):.3g}×‖ΔW‖")
    lost = [t for t in worst if t.adapter_kept < LOST_BELOW]
    if not lost:
        return line, None
    shown = ", ".join(f"{t.name} ({t.adapter_kept:.2f})" for t in lost[:named])
    return line, (f"requantization kept less than {LOST_BELOW:.0%} of the adapter's update in {len(lost)} of "
                  f"{len(measured)} tensors, e.g. {shown}: merge with --dequantize to keep the update whole")
