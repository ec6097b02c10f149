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
            log.info("[%d/%d] %s: %.1f MB%s, %s", self.done, self.shards, name, size / 1e6,
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
