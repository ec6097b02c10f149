"""Errors that cross the library boundary, each mapped to one exit code by the CLI."""

from __future__ import annotations

import threading
from typing import Sequence


class InputError(Exception):
    """Bad input: the user must change a file or a flag. Never retried (exit 2)."""

    def __init__(self, subject: str, what: str, fix: str):
        super().__init__(subject, what, fix)
        self.subject = subject
        self.what = what
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.subject}: {self.what} ({self.fix})"


class TransientStorageError(Exception):
    """A storage or network failure that a retry may cure (exit 3 once retries are spent)."""


class Stopped(Exception):
    """The job was stopped (Ctrl-C, SIGTERM) while this task ran in the driver's process: the task
    ended at a tensor's boundary, its uploads aborted. Not a failure of the input or the store."""


def raise_if_stopped(stop: threading.Event | None, where: str) -> None:
    """A task that shares the driver's process (--executor local) is stopped by `stop`, between steps."""
    if stop is not None and stop.is_set():
        raise Stopped(f"{where}: the job was stopped")


class ValidationError(Exception):
    """The merged output is not what the inputs make (exit 4). Carries every problem found."""

    def __init__(self, problems: Sequence[str]):
        super().__init__(list(problems))
        self.problems = list(problems)

    def __str__(self) -> str:
        more = len(self.problems) - 1
        return self.problems[0] + (f" (and {more} more problem{'s' if more > 1 else ''})" if more > 0 else "")
