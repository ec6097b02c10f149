"""Run one Ray task per shard over the lanes, retrying transient failures, never bad input.

Retries are the driver's, not Ray's (tasks run with max_retries=0): the driver sees every
failure, so it can tell a flaky store or a lost worker (retried, counted per shard, reported)
from bad input or a validation failure (raised at once, never retried).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

import ray
from ray import exceptions as ray_errors

from jobs.progress import Progress
from jobs.scheduling import Lane, free_lane
from merge_core.errors import InputError, TransientStorageError, ValidationError

log = logging.getLogger("lora_merge")
MAX_ATTEMPTS = 4
CANCEL_WAIT_SECONDS = 10  # how long a cancelled task may take to die before the output is cleaned
# Failures a second attempt may cure: the store or network, or the worker or node under the task.
TRANSIENT = (TransientStorageError, ConnectionError, TimeoutError, ray_errors.WorkerCrashedError,
             ray_errors.NodeDiedError, ray_errors.ObjectLostError, ray_errors.OwnerDiedError,
             ray_errors.RaySystemError, ray_errors.LocalRayletDiedError, ray_errors.OutOfMemoryError)
Job = TypeVar("Job")
Result = TypeVar("Result")


@dataclass
class Outcome(Generic[Result]):
    results: list[Result] = field(default_factory=list)
    retries: dict[str, int] = field(default_factory=dict)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (InputError, ValidationError)):
        return False
    if isinstance(exc, TRANSIENT):
        return True
    cause = getattr(exc, "cause", None)  # a RayTaskError wraps what the task raised
    return isinstance(cause, TRANSIENT) and not isinstance(cause, (InputError, ValidationError))


def run_over_lanes(jobs: Sequence[Job], lanes: Sequence[Lane], submit: Callable[[Job, dict], ray.ObjectRef],
                   name_of: Callable[[Job], str], on_result: Callable[[Job, Result], None],
                   progress: Progress | None = None) -> Outcome[Result]:
    """Submit jobs into free lane slots, wait with ray.wait, retry transient failures."""
    queue = list(jobs)
    attempts: dict[str, int] = {}
    pending: dict[ray.ObjectRef, tuple[Job, Lane]] = {}
    outcome: Outcome[Result] = Outcome()
    try:
        while queue or pending:
            lane = free_lane(lanes)
            if queue and lane:
                job = queue.pop(0)
                attempts[name_of(job)] = attempts.get(name_of(job), 0) + 1
                pending[submit(job, lane.options)] = (job, lane)
                lane.running += 1
                continue
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            if progress:
                progress.draw()
            if not done:
                continue
            job, lane = pending.pop(done[0])
            lane.running -= 1
            try:
                result = ray.get(done[0])
            except Exception as exc:
                name = name_of(job)
                if not _is_transient(exc) or attempts[name] >= MAX_ATTEMPTS:
                    raise
                outcome.retries[name] = outcome.retries.get(name, 0) + 1
                if progress:
                    progress.retry(name, _one_line(exc), attempts[name] + 1)
                queue.insert(0, job)
                continue
            outcome.results.append(result)
            on_result(job, result)
    except BaseException:
        cancel_all(list(pending))
        raise
    return outcome


def cancel_all(refs: Sequence[ray.ObjectRef]) -> None:
    """Kill the tasks behind `refs` and wait (briefly) until they are gone, so that nothing they
    were writing can appear after the caller has cleaned up the output."""
    for ref in refs:
        ray.cancel(ref, force=True)
    if refs:
        ray.wait(list(refs), num_returns=len(refs), timeout=CANCEL_WAIT_SECONDS)


def get_with_retries(submit: Callable[[], ray.ObjectRef], name: str):
    """Run one task to its result, retrying transient failures as shard tasks are."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            return ray.get(submit())
        except Exception as exc:
            if not _is_transient(exc) or attempt == MAX_ATTEMPTS:
                raise
            log.warning("retrying %s (attempt %d): %s", name, attempt + 1, _one_line(exc))


def _one_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"
