"""Run one task per shard over the lanes of an executor, retrying transient failures, never bad
input; and stop them all when the job is told to stop.

Retries are the driver's, not Ray's (tasks run with max_retries=0): the driver sees every
failure, so it can tell a flaky store or a lost worker (retried, counted per shard, reported)
from bad input or a validation failure (raised at once, never retried).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Generic, Iterable, Iterator, Sequence, TypeVar

from jobs.executor import Executor
from jobs.progress import Progress
from jobs.scheduling import Lane, free_lane
from merge_core.errors import InputError, ValidationError

log = logging.getLogger("lora_merge")
MAX_ATTEMPTS = 4
# Between attempts of a task: exponential backoff with jitter ("equal jitter": half the step
# fixed, half random), so that many tasks failing together (a store throttling, a node lost) come
# back spread out. A shard's three retries wait about 1, 2 and 4 s; the final task's 2, 4 and 8 s,
# so that a store failing for a while gets ~14 s before a whole job's work waits for a --resume.
SHARD_BACKOFF_SECONDS = 1.0
FINAL_BACKOFF_SECONDS = 2.0
BACKOFF_CAP_SECONDS = 30.0
Job = TypeVar("Job")
Result = TypeVar("Result")


def backoff(attempt: int, base: float, rng: random.Random = random) -> float:
    """Seconds to wait after failed attempt number `attempt` (1, 2, ...)."""
    step = min(BACKOFF_CAP_SECONDS, base * 2 ** (attempt - 1))
    return step / 2 + rng.uniform(0, step / 2)


@dataclass
class Outcome(Generic[Result]):
    results: list[Result] = field(default_factory=list)
    retries: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, list[str]] = field(default_factory=dict)  # each retried failure, in one line

    def retried(self, name: str, reason: str) -> None:
        self.retries[name] = self.retries.get(name, 0) + 1
        self.reasons.setdefault(name, []).append(reason)


def is_transient(exc: BaseException, transient: tuple[type[BaseException], ...]) -> bool:
    if isinstance(exc, (InputError, ValidationError)):
        return False
    if isinstance(exc, transient):
        return True
    cause = getattr(exc, "cause", None)  # a RayTaskError wraps what the task raised
    return isinstance(cause, transient) and not isinstance(cause, (InputError, ValidationError))


def run_over_lanes(executor: Executor, jobs: Sequence[Job], lanes: Sequence[Lane],
                   submit: Callable[[Job, dict], object], name_of: Callable[[Job], str],
                   on_result: Callable[[Job, Result], Iterable[tuple[float, Job]] | None],
                   progress: Progress | None = None,
                   on_failure: Callable[[Job, BaseException], None] | None = None) -> Outcome[Result]:
    """Submit jobs into free lane slots (`submit` returns the executor's handle, or None when the
    job has nothing left to do), wait for the first to finish, retry transient failures after a
    backoff. `on_result` may return jobs to run again, each after a delay (a part of the work that
    failed by itself); `on_failure`, when given, takes a job's lasting failure instead of it
    ending the run."""
    queue: list[tuple[float, Job]] = [(0.0, job) for job in jobs]  # (not before, job)
    attempts: dict[str, int] = {}
    pending: dict[object, tuple[Job, Lane]] = {}
    outcome: Outcome[Result] = Outcome()
    try:
        while queue or pending:
            lane = free_lane(lanes)
            ready = next((i for i, (when, _) in enumerate(queue) if when <= time.monotonic()), None)
            if ready is not None and lane:
                job = queue.pop(ready)[1]
                handle = submit(job, lane.options)
                if handle is None:
                    continue
                attempts[name_of(job)] = attempts.get(name_of(job), 0) + 1
                pending[handle] = (job, lane)
                lane.running += 1
                continue
            if not pending:  # only retries waiting out their backoff
                time.sleep(max(0.0, min(0.5, min(when for when, _ in queue) - time.monotonic())))
                continue
            done = executor.wait(list(pending), 0.5)
            if progress:
                progress.draw()
            if not done:
                continue
            job, lane = pending.pop(done[0])
            lane.running -= 1
            try:
                result = executor.get(done[0])
            except Exception as exc:
                name = name_of(job)
                if not is_transient(exc, executor.transient) or attempts[name] >= MAX_ATTEMPTS:
                    if on_failure is None:
                        raise
                    on_failure(job, exc)
                    continue
                wait = backoff(attempts[name], SHARD_BACKOFF_SECONDS)
                outcome.retried(name, one_line(exc))
                if progress:
                    progress.retry(name, f"{one_line(exc)}; again in {wait:.1f} s", attempts[name] + 1)
                queue.insert(0, (time.monotonic() + wait, job))
                continue
            outcome.results.append(result)
            for delay, again in on_result(job, result) or ():
                queue.append((time.monotonic() + delay, again))
    except BaseException:
        executor.cancel(list(pending))
        raise
    return outcome


def get_with_retries(executor: Executor, submit: Callable[[list[str]], object], name: str,
                     base: float = FINAL_BACKOFF_SECONDS):
    """Run one task to its result, retrying transient failures after a backoff; `submit` gets the
    reasons of the attempts before (for the record the task writes). Stopped (Ctrl-C, SIGTERM),
    the task is cancelled before the interruption goes on."""
    reasons: list[str] = []
    for attempt in range(1, MAX_ATTEMPTS + 1):
        ref = submit(list(reasons))
        try:
            return executor.get(ref)
        except KeyboardInterrupt:
            executor.cancel([ref])
            raise
        except Exception as exc:
            if not is_transient(exc, executor.transient) or attempt == MAX_ATTEMPTS:
                raise
            wait = backoff(attempt, base)
            reasons.append(one_line(exc))
            log.warning("retrying %s (attempt %d) in %.1f s: %s", name, attempt + 1, wait, one_line(exc))
            time.sleep(wait)


def one_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


# Stopping: SIGTERM (what Kubernetes sends a pod it deletes, and `ray job stop`) and SIGINT (Ctrl-C).
EXIT_SIGNALS = {"SIGTERM": 3, "SIGINT": 130}
_received: list[str] = []  # the signals the current stop_signals() block has seen
_installed = False


class Interrupted(KeyboardInterrupt):
    """The job was stopped by a signal, and cleaned up after itself; the message says what is left."""

    def __init__(self, signal_name: str, message: str):
        super().__init__(message)
        self.signal_name = signal_name
        self.exit_code = EXIT_SIGNALS.get(signal_name, 130)


def _on_signal(signum: int, frame) -> None:
    name = signal.Signals(signum).name
    if _received:  # asked twice: stop now, cleanup or not (a --resume discards what is left)
        os.write(2, f"error: {name} again: stopped at once (a --resume run finishes the merge)\n".encode())
        os._exit(EXIT_SIGNALS.get(name, 130))
    _received.append(name)
    # KeyboardInterrupt, whatever the signal: the one exception Ray's blocking calls (ray.get,
    # ray.wait) let through; stopped_by() tells which signal it was.
    raise KeyboardInterrupt(name)


def reclaim_signals() -> None:
    """ray.init installs its own SIGTERM handler (sys.exit, no cleanup): take SIGTERM back."""
    if _installed:
        signal.signal(signal.SIGTERM, _on_signal)


def stopped_by() -> str | None:
    """The first stop signal received in the current stop_signals() block, if any."""
    return _received[0] if _received else None


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise KeyboardInterrupt in the main thread, so the job
    cancels its tasks, aborts its uploads and keeps its journal on the way out; a second one exits
    at once. The handlers before are restored after (the CLI may run inside another program)."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    _received.clear()
    _installed = True
    try:
        for s in saved:
            signal.signal(s, _on_signal)
        yield
    finally:
        _installed = False
        for s, handler in saved.items():
            if handler is not None:  # None: set outside Python, which cannot be put back from here
                signal.signal(s, handler)
