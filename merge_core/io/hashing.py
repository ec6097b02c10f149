"""The digests of shards: which algorithms, how a value names its algorithm, and a hasher that keeps
count of the time it spent (hashing runs on threads of its own, behind the reads and the writes,
and a shard's report says how long it took there).

BLAKE3 by default: cryptographic (a registry may key on it, and nobody can make two shards that
share one), and several times faster than sha256 per core; sha256 on request for registries that
key on it. Measured on the 2-core development machine, one thread, 16 MiB updates: sha256
1.56 GB/s, BLAKE3 3.38 GB/s (3.51 with its own threads: the cores are the fuse's anyway),
xxh3-128 20.5 GB/s and CRC64NVME 12.1 GB/s (neither is cryptographic, so neither can name a
model's bytes in a registry: rejected).

A value is carried as "algorithm:hex" (a tagged digest), so that a journal or a manifest written
with another algorithm (every one before BLAKE3 was sha256) is still checked with its own: the
manifest stores it as `{"<algorithm>": "<hex>"}`, the form sha256 always had.
"""

from __future__ import annotations

import hashlib
import time
from typing import Mapping

import blake3

DIGESTS = ("blake3", "sha256")
DEFAULT_DIGEST = "blake3"


def new_hasher(algorithm: str):
    if algorithm == "blake3":
        return blake3.blake3()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown digest {algorithm!r}: one of {', '.join(DIGESTS)}")


def tagged(algorithm: str, hexdigest: str) -> str:
    return f"{algorithm}:{hexdigest}"


def algorithm_of(value: str) -> str:
    """The algorithm of a tagged digest; an untagged one is a sha256 (what every record had before)."""
    algorithm, sep, _ = value.partition(":")
    return algorithm if sep else "sha256"


def hex_of(value: str) -> str:
    return value.partition(":")[2] or value


def record_digest(record: Mapping[str, object], prefix: str = "") -> str | None:
    """The tagged digest a manifest record holds under `<prefix><algorithm>` (sha256 in every
    manifest before the digest was chosen), or None."""
    for algorithm in DIGESTS:
        value = record.get(prefix + algorithm)
        if isinstance(value, str):
            return tagged(algorithm, value)
    return None


def record_fields(value: str, prefix: str = "") -> dict[str, str]:
    """A tagged digest as a manifest record stores it."""
    return {prefix + algorithm_of(value): hex_of(value)}


class TimedDigest:
    def __init__(self, algorithm: str = DEFAULT_DIGEST) -> None:
        self.algorithm = algorithm
        self._digest = new_hasher(algorithm)
        self.seconds = 0.0

    def update(self, data: bytes | memoryview) -> None:
        started = time.perf_counter()
        self._digest.update(data)
        self.seconds += time.perf_counter() - started

    def value(self) -> str:
        """The tagged digest of what was hashed."""
        return tagged(self.algorithm, self._digest.hexdigest())
