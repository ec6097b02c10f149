"""One writer per output: a run holds its output with a claim only one job can create (an
exclusive create on a file system, `If-None-Match: *` on S3) that names the holder and the end of
its lease, which the holder renews while it runs. Another job is refused at once; a claim whose
holder is gone (its lease ended, or its process on this host is dead) is taken over by --resume or
--overwrite, with a line saying so, never silently."""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from merge_core.errors import InputError
from merge_core.io.storage import Storage
from merge_core.names import CLAIM_NAME

log = logging.getLogger("lora_merge")


def _utc(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class Holder:
    run: str
    host: str
    pid: int
    command: str
    started: float
    until: float  # the lease's end, seconds since the epoch

    def describe(self) -> str:
        return f"run {self.run} ({self.command}, pid {self.pid} on {self.host}, since {_utc(self.started)})"

    def gone(self, now: float) -> str | None:
        """Why the holder no longer holds the output, or None while it may."""
        if self.until <= now:
            return f"its lease ended at {_utc(self.until)}"
        if self.host == socket.gethostname() and not _alive(self.pid):
            return f"its process {self.pid} on this host is gone"
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class Lease:
    """This run's hold on `output`, renewed every third of `seconds` while it runs."""

    def __init__(self, output: Storage, seconds: float, command: str):
        self.output, self.seconds = output, seconds
        self.me = Holder(uuid.uuid4().hex[:12], socket.gethostname(), os.getpid(), command, time.time(), 0.0)
        self.held = False
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def holder(self) -> Holder | None:
        try:
            return Holder(**json.loads(self.output.read_bytes(CLAIM_NAME)))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):  # unreadable: a claim written by nobody we know
            return Holder("unknown", "unknown", 0, "unknown", 0.0, 0.0)

    def refuse_live(self) -> None:
        """Refuse (InputError) an output another job is writing now."""
        other = self.holder()
        if other is not None and other.gone(time.time()) is None:
            raise InputError(self.output.describe(CLAIM_NAME), f"another job is writing this output: "
                             f"{other.describe()}; its lease ends at {_utc(other.until)} unless it renews it",
                             "wait for it to finish, or choose another --output")

    def check(self, may_take_over: bool) -> Holder | None:
        """Refuse (InputError) an output another job holds; returns a gone holder's claim, which
        `take` replaces (only with may_take_over)."""
        self.refuse_live()
        other = self.holder()
        if other is None:
            return None
        where = self.output.describe(CLAIM_NAME)
        gone = other.gone(time.time())
        if not may_take_over:
            raise InputError(where, f"{other.describe()} held this output and {gone}",
                             "run the same command with --resume to take the output over and finish it")
        return other

    def take(self, may_take_over: bool) -> None:
        """Claim the output (before anything else is written there) and start renewing."""
        gone = self.check(may_take_over)
        if gone is not None:
            log.warning("taking over %s from %s: %s", self.output.uri, gone.describe(), gone.gone(time.time()))
            self.output.delete(CLAIM_NAME)
        try:
            self.output.write_bytes(CLAIM_NAME, self._record(), exclusive=True)
        except FileExistsError:  # another job claimed it between our look and our create
            self.check(False)
            raise
        self.held = True
        self._renewer = threading.Thread(target=self._renew, name="lora-merge-lease", daemon=True)
        self._renewer.start()

    def _record(self) -> bytes:
        return json.dumps(asdict(self.me) | {"until": time.time() + self.seconds}).encode()

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                current = self.holder()
                if current is None or current.run != self.me.run:
                    log.warning("%s: this run's claim was taken by %s; it will not publish", self.output.uri,
                                current.describe() if current else "nobody")
                    return
                self.output.write_bytes(CLAIM_NAME, self._record())
            except Exception as exc:  # the store may be down a while: the lease lasts until it is back
                log.warning("could not renew the claim on %s: %s", self.output.uri, exc)

    def release(self) -> None:
        """Let the output go (the run ended, done or not): the next run need not wait for the lease."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=10)
        if not self.held:
            return
        self.held = False
        try:
            current = self.holder()
            if current is not None and current.run == self.me.run:
                self.output.delete(CLAIM_NAME)
        except Exception as exc:  # the store may be what failed; the lease ends by itself
            log.warning("could not release the claim on %s: %s", self.output.uri, exc)
