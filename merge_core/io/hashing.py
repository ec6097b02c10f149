"""sha256 that keeps count of the time it spent: hashing runs on threads of its own, behind the
reads and the writes, and a shard's report says how long it took there."""

from __future__ import annotations

import hashlib
import time


class TimedSha256:
    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self.seconds = 0.0

    def update(self, data: bytes | memoryview) -> None:
        started = time.perf_counter()
        self._digest.update(data)
        self.seconds += time.perf_counter() - started

    def hexdigest(self) -> str:
        return self._digest.hexdigest()
