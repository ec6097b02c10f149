"""What the driver shows while a job runs: a live bar on a terminal, one log line per shard otherwise,
a ProgressEvent for each step to a caller's callback (the Python API's `progress=`), and a closing
summary table."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence, TextIO

log = logging.getLogger("lora_merge")
BAR_WIDTH = 28
REDRAW_SECONDS = 0.5


@dataclass(frozen=True, kw_only=True)
class ProgressEvent:
    """One step of a running job, as a progress callback receives it."""
    kind: str  # "shard_done" (merged, verified or reused) or "retry"
    shard: str
    shards_done: int
    shards_total: int
    bytes_done: int
    bytes_total: int
    retries: int
    detail: str = ""  # what the step did, or why the retry
    reused: bool = False  # a shard --resume took from the interrupted run

    @property
    def fraction(self) -> float:
        return self.shards_done / self.shards_total if self.shards_total else 1.0


class Progress:
    def __init__(self, shards: int, total_bytes: int, stream: TextIO = sys.stderr, live: bool | None = None,
                 callback: Callable[[ProgressEvent], None] | None = None):
        self.shards, self.total_bytes = shards, total_bytes
        self.callback = callback
        self.done = self.done_bytes = self.retries = self.reused = 0
        self.started = time.perf_counter()
        self.stream = stream
        self.live = stream.isatty() if live is None else live
        self._drawn = 0.0

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.started
        return self.done_bytes / elapsed if elapsed > 0 else 0.0

    def shard_done(self, name: str, size: int, detail: str, reused: bool = False) -> None:
        self.done += 1
        self.done_bytes += size
        self.reused += reused
        self._tell("shard_done", name, detail, reused)
        if self.live:
            self.draw(force=True)
        else:
            log.info("[%d/%d] %s: %s%s, %s", self.done, self.shards, name, size_text(size),
                     " (reused)" if reused else "", detail)

    def retry(self, name: str, reason: str, attempt: int) -> None:
        self.retries += 1
        self._tell("retry", name, reason)
        if self.live:
            self.stream.write("\n")
        log.warning("retrying %s (attempt %d): %s", name, attempt, reason)

    def _tell(self, kind: str, name: str, detail: str, reused: bool = False) -> None:
        if self.callback:
            self.callback(ProgressEvent(kind=kind, shard=name, shards_done=self.done, shards_total=self.shards,
                                        bytes_done=self.done_bytes, bytes_total=self.total_bytes, retries=self.retries,
                                        detail=detail, reused=reused))

    def draw(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.live or (not force and now - self._drawn < REDRAW_SECONDS):
            return
        self._drawn = now
        filled = int(BAR_WIDTH * self.done / self.shards) if self.shards else BAR_WIDTH
        rate = self.rate
        remaining = (self.total_bytes - self.done_bytes) / rate if rate > 0 else float("nan")
        eta = f"{remaining:5.0f}s" if remaining == remaining else "    ?"
        self.stream.write(f"\r[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {self.done}/{self.shards} shards "
                          f"{self.done_bytes / 1e9:6.2f}/{self.total_bytes / 1e9:.2f} GB {rate / 1e9:5.2f} GB/s "
                          f"ETA {eta} retries {self.retries}")
        self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()


def summary_table(rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * (max(len(v) for _, v in rows) + 2) + "+"
    body = [f"| {k:<{width}} | {v:<{len(line) - width - 7}} |" for k, v in rows]
    return "\n".join([line, *body, line])


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def size_text(nbytes: float) -> str:
    """GB from 1 GB up, MB below (a 40 MB demo is not "0.04 GB")."""
    if nbytes >= 1e9:
        return f"{nbytes / 1e9:.2f} GB"
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e5 else f"{nbytes / 1e6:.3f} MB"


def rate_text(nbytes: float, seconds: float) -> str:
    per_second = nbytes / seconds if seconds > 0 else 0.0
    return f"{per_second / 1e9:.2f} GB/s" if per_second >= 1e9 else f"{per_second / 1e6:.1f} MB/s"


def merge_rows(summary, resumed: bool) -> list[tuple[str, str]]:
    """The closing table of a merge or unmerge (a jobs.driver.MergeSummary)."""
    rows = [
        ("output", summary.output),
        ("adapters", "; ".join(f"{a['uri']} (weight {a['weight']:g})" for a in summary.adapters)),
        ("shards", f"{summary.shards} ({plural(summary.tensors, 'tensor')})"),
        ("fused tensors", str(summary.fused_tensors)),
        ("read", size_text(summary.bytes_read)),
        ("written", size_text(summary.bytes_written)),
        ("wall time", f"{summary.seconds:.1f} s ({rate_text(summary.bytes_written, summary.seconds)} written)"),
        ("nodes", f"{len(summary.nodes)}, device {summary.device}" if summary.nodes else
         "none: every shard was reused"),
        ("retries", str(summary.retries)),
        ("reused shards", f"{summary.reused} (--resume)" if resumed else "0"),
        ("validated", "yes: headers, index, sizes (on object stores each shard's CRC32 checked by the store, or "
                      "read back), NaN/Inf, float64 spot check"
         if summary.validated else "no (--no-validate)"),
    ]
    recovered = summary.manifest.get("recovery")
    if recovered:
        share = recovered["elements_identical"] / max(1, recovered["elements"])
        rows.append(("came back bit for bit", f"{recovered['tensors_identical']} of {recovered['tensors']} tensors, "
                     f"{share:.1%} of elements; the rest within {recovered['max_ulps']} ulp of "
                     f"{recovered['original']}"))
    if summary.adapter_kept:
        rows.append(("adapter kept", summary.adapter_kept))
    return rows


def batch_rows(summary) -> list[tuple[str, str]]:
    """The closing table of a batch (a jobs.batch.BatchSummary): what was read once, and each output."""
    read_once = f"{size_text(summary.bytes_read)} from the base ({size_text(summary.base_bytes)}: each shard once, " \
                f"{plural(summary.tasks, 'task')}) for {plural(len(summary.outputs), 'output')}"
    rows = [("base", summary.base), ("read", read_once), ("written", size_text(summary.bytes_written)),
            ("wall time", f"{summary.seconds:.1f} s ({rate_text(summary.bytes_written, summary.seconds)} written)")]
    for number, outcome in enumerate(summary.outputs, 1):
        done = outcome.summary
        if outcome.error is not None:
            state = "FAILED (see the error below)"
        elif done.already_complete:
            state = "already complete: its manifest records this very merge; nothing was written"
        else:
            state = (f"{plural(done.shards, 'shard')}, {done.fused_tensors} fused tensors, "
                     f"{size_text(done.bytes_written)} written"
                     + (f", {done.reused} shards reused" if done.reused else "")
                     + (f", {plural(done.retries, 'retry')}" if done.retries else ""))
            if done.adapter_kept:
                state += f"; adapter kept {done.adapter_kept}"
        rows.append((f"output {number}", f"{outcome.output}: {state}"))
    return rows
