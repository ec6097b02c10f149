"""What a worker reports for a merged shard, and the read-back that proves storage holds it.

Free of torch, so that the driver (which only plans, schedules and publishes) never loads it.
"""

from __future__ import annotations

from dataclasses import dataclass

from merge_core.errors import ValidationError
from merge_core.io.hashing import algorithm_of
from merge_core.io.pipeline import digest_of
from merge_core.io.storage import Storage
from merge_core.numerics.stats import FuseStats


@dataclass(frozen=True, kw_only=True)
class ShardResult:
    """What a task returns through Ray: small, no tensors."""
    name: str
    size: int
    digest: str  # tagged ("blake3:<hex>", merge_core.io.hashing) digest of the shard written
    base_digest: str  # of the base shard read, with the same algorithm
    tensors: int
    fused: int
    read_wait_seconds: float  # time spent waiting for reads the read-ahead had not finished
    fuse_seconds: float
    write_seconds: float
    seconds: float
    device: str
    node: str
    fused_stats: tuple[tuple[str, FuseStats], ...] = ()  # per fused tensor, in file order
    hash_seconds: float = 0.0  # digests of the base and of the output, on threads beside the fuse
    # Bytes the task fetched from the base (counted as they arrived), and how many outputs it wrote
    # from them: a batch reads each base shard once for all its outputs.
    base_bytes_read: int = 0
    outputs: int = 1
    # Bytes of the output the store copied from the base itself (S3 UploadPartCopy/CopyObject), not
    # sent by the task: what no adapter changed.
    bytes_copied: int = 0


def check_stored(storage: Storage, name: str, size: int, digest: str, rehash: bool = True) -> None:
    """Read the published object back: storage must hold exactly the bytes that were hashed (with
    `rehash` False, only as many). `digest` is tagged: it is recomputed with its own algorithm."""
    stored = storage.size(name)
    if stored != size:
        raise ValidationError([f"{storage.describe(name)}: storage holds {stored} bytes, the worker wrote {size}"])
    if not rehash:
        return
    stored_digest = digest_of(storage, name, size, algorithm_of(digest))
    if stored_digest != digest:
        raise ValidationError([f"{storage.describe(name)}: {algorithm_of(digest)} of the stored bytes is "
                               f"{stored_digest}, the worker wrote {digest}"])
