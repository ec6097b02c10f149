"""lora-merge from Python: merge, unmerge, verify, plan, report and batch as functions over URIs and
keyword options, returning typed results and raising the project's errors. The command line is a
thin layer over these; both take the options jobs/options.py declares, with the same defaults.

Options are the long flags with underscores (`overwrite=True`, `device="cpu"`,
`ray_address="auto"`, `combine="ties"`, `density=0.5`, ...). A merge runs on the Ray cluster this
process has joined, else the one at `ray_address`, else a local Ray started for it (with
`executor="local"`: on threads of this process, no Ray); `progress` is called with a ProgressEvent
as each shard finishes or is retried.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from jobs.batch import BatchSummary, run_batch
from jobs.driver import MergeSummary, ProgressCallback, run_merge
from jobs.executor import Executor
from jobs.options import (
    OUTPUT_ONLY,
    BatchOptions,
    MergeOptions,
    PlanOptions,
    ReportOptions,
    UnmergeOptions,
    VerifyOptions,
    build,
    defaults,
    key_of,
    output_keys,
    outputs_of,
)
from jobs.plan_view import BatchPlanSummary, PlanSummary, run_batch_plan, run_plan
from jobs.recorded import with_recorded
from jobs.verify_job import VerifySummary, run_verify
from merge_core.publish.report_view import ReportView

log = logging.getLogger("lora_merge")


def options_for(kind: type, **values):
    """The options dataclass `kind` from keyword values over its defaults; an option the command
    does not take is a TypeError naming the ones it does."""
    known = {key_of(f) for f in dataclasses.fields(kind) if f.metadata.get("flag") or f.metadata.get("spec")}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return build(kind, _as_lists(defaults(kind) | {k: v for k, v in values.items() if v is not None}))


def _as_lists(values: Mapping[str, object]) -> dict:
    """`adapters` and `weights` given as one value, as the one-item lists they stand for."""
    values = dict(values)
    for name in ("adapters", "weights"):
        if isinstance(values.get(name), (str, int, float)):
            values[name] = [values[name]]
    return values


def write_json(path: str | None, data: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2, default=str)


def run(options: MergeOptions, executor: Executor | None = None,
        progress: ProgressCallback | None = None) -> MergeSummary:
    """A merge (or unmerge) from its options: the picture (report_png) checked for before and drawn
    after, what the stored weights kept of the update measured for a quantized base, the JSON
    summary written (report)."""
    _check_picture(options)
    summary = run_merge(options, executor, progress)
    _after_merge(options, summary)
    write_json(options.report, summary.as_dict())
    return summary


def run_batch_job(options: BatchOptions, executor: Executor | None = None,
                  progress: ProgressCallback | None = None) -> BatchSummary:
    """A batch from its options: each published output's picture and survival as a merge's, the
    batch's JSON summary written (report). An output's failure is in the summary, not raised."""
    merges = outputs_of(options)
    for merge in merges:
        _check_picture(merge)
    summary = run_batch(options, executor, progress)
    for merge, outcome in zip(merges, summary.outputs):
        if outcome.summary is not None and not outcome.summary.already_complete:
            _after_merge(merge, outcome.summary)
    write_json(options.report, summary.as_dict())
    return summary


def _check_picture(options: MergeOptions) -> None:
    if options.report_png:  # refused before the merge, not after it
        from merge_core.publish.report_plot import require_matplotlib

        require_matplotlib("--report-png")


def _after_merge(options: MergeOptions, summary: MergeSummary) -> None:
    """What the stored weights kept of the update (a quantized base), and the picture (report_png)."""
    changes = summary.manifest.get("model_changes", {})
    view = None
    if options.report_png or changes.get("requantized_tensors") or changes.get("dequantized_tensors"):
        from jobs.report_cmd import draw, read_view, survival

        view = read_view(summary.output)
        summary.adapter_kept, warning = survival(view)
        if warning:
            log.warning(warning)
        if options.report_png:
            summary.pictures = draw(view, options.report_png, None, "")


def merge(base: str, adapters: str | Sequence[str], output: str, *, weights: Sequence[float] | float = (),
          progress: ProgressCallback | None = None, **options) -> MergeSummary:
    """Fuse `adapters` into `base` and publish the merged checkpoint at `output` (each a local path
    or s3://bucket/prefix). Raises InputError for bad input (nothing written), ValidationError when
    the merged model fails its checks (no index written), Interrupted when stopped by a signal."""
    return run(options_for(MergeOptions, base=base, adapters=adapters, output=output, weights=weights, **options),
               progress=progress)


def unmerge(merged: str, adapters: str | Sequence[str], output: str, *, original: str | None = None,
            progress: ProgressCallback | None = None, **options) -> MergeSummary:
    """Take `adapters` back out of `merged` (a lora-merge or PEFT merge) into `output`, as PEFT's
    unmerge_adapter() does, with the weights its manifest records unless given; `original`: the
    original base, to compare with and restore from."""
    chosen = options_for(UnmergeOptions, base=merged, adapters=adapters, output=output, original=original, **options)
    return run(with_recorded(chosen, set(options), merged), progress=progress)


def verify(base: str, adapters: str | Sequence[str], merged: str, *, weights: Sequence[float] | float = (),
           progress: ProgressCallback | None = None, **options) -> VerifySummary:
    """Re-read every shard of `merged` and merge every tensor again: the findings are the summary's
    `problems` (`ok` when there are none). The weights and arithmetic not given are taken from the
    merged model's manifest. Raises InputError for bad input."""
    chosen = options_for(VerifyOptions, base=base, adapters=adapters, merged=merged, weights=weights, **options)
    return run_verify(with_recorded(chosen, set(options) | ({"weights"} if weights else set()), merged),
                      progress=progress)


def plan(base: str, adapters: str | Sequence[str], *, weights: Sequence[float] | float = (),
         **options) -> PlanSummary:
    """What a merge would read, fuse and write, from headers alone; writes nothing, starts no Ray."""
    return run_plan(options_for(PlanOptions, base=base, adapters=adapters, weights=weights, **options))


def batch(base: str, outputs: Sequence[Mapping[str, object]], *, progress: ProgressCallback | None = None,
          **options) -> BatchSummary:
    """Several merged models from one read of `base`: each of `outputs` a mapping of that output's
    options (`output`, `adapters`, and as it needs `weights`, `combine`, `density`, `dequantize`,
    `resume`, ...: the keys of an entry of a job spec's `outputs`), each written exactly as its own
    merge() would write it. `options`: the whole job's (device, ray_address, ...), and outputs'
    options that apply to every output. Raises InputError for a bad batch (nothing written); an
    output's own failure is its outcome's `error` in the BatchSummary (`ok` when none failed)."""
    _check_batch_keywords(options)
    if {"plan", "json"} & set(options):
        raise TypeError("batch() merges; plan_batch() shows what it would do")
    return run_batch_job(options_for(BatchOptions, base=base, outputs=_outputs(outputs), **options),
                         progress=progress)


def plan_batch(base: str, outputs: Sequence[Mapping[str, object]], **options) -> BatchPlanSummary:
    """What batch() would read, fuse and write, from headers alone; writes nothing, starts no Ray."""
    _check_batch_keywords(options)
    return run_batch_plan(options_for(BatchOptions, base=base, outputs=_outputs(outputs), **options))


def _check_batch_keywords(options: Mapping[str, object]) -> None:
    own = sorted(set(options) & set(OUTPUT_ONLY))
    if own:
        raise TypeError(f"{', '.join(own)}: an output's own, given in its entry of outputs")


def _outputs(outputs: Sequence[Mapping[str, object]]) -> list[dict]:
    """The outputs as a batch takes them: an option an output does not take is a TypeError."""
    known = set(output_keys()) | {"weights"}
    entries = []
    for entry in outputs:
        unknown = sorted(set(entry) - known)
        if unknown:
            raise TypeError(f"unknown output option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        entries.append(_as_lists(entry))
    return entries


@dataclass(frozen=True)
class ReportSummary:
    """What a merge changed, from the merged model's own report and manifest."""
    merged: str
    text: str  # the summary `lora-merge report` prints
    view: ReportView = field(repr=False)  # every tensor's row, the adapters, the heatmap's grids
    written: tuple[str, ...] = ()  # where the picture and the page went


def report(merged: str, *, png: str | None = None, html: str | None = None) -> ReportSummary:
    """Read `merged`'s merge_report.parquet and manifest; draw the heatmap to `png` and the page to
    `html` (local paths or s3:// URIs) when given."""
    from jobs.report_cmd import draw, read_view
    from merge_core.publish.report_summary import summary_text

    options = options_for(ReportOptions, merged_uri=merged, png=png, html=html)
    view = read_view(options.merged_uri)
    text = summary_text(view)
    return ReportSummary(options.merged_uri, text, view, tuple(draw(view, options.png, options.html, text)))


