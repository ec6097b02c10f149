"""Errors that cross the library boundary, each mapped to one exit code by the CLI."""

from __future__ import annotations


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


class ValidationError(Exception):
    """The merged output does not match what was planned (exit 4)."""

    def __init__(self, subject: str, what: str):
        super().__init__(subject, what)
        self.subject = subject
        self.what = what

    def __str__(self) -> str:
        return f"{self.subject}: {self.what}"
