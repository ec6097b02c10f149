"""What a worker reports for a merged shard, and the read-back that proves storage holds it.

Free of torch, so that the driver (which only plans, schedules and publishes) never loads it.
"""

from __future__ import annotations

from dataclasses import dataclass

from merge_core.errors import ValidationError
from merge_core.io.pipeline import sha256_of
from merge_core.io.storage import Storage
from merge_core.numerics.stats import FuseStats


@dataclass(frozen=True, kw_only=True)
class ShardResult:
    """What a task returns through Ray: small, no tensors."""
    name: str
    size: int
    sha256: str
    base_sha256: str
    tensors: int
    fused: int
    read_wait_seconds: float  # time spent waiting for reads the read-ahead had not finished
    fuse_seconds: float
    write_seconds: float
    seconds: float
    device: str
    node: str
    fused_stats: tuple[tuple[str, FuseStats], ...] = ()  # per fused tensor, in file order
    hash_seconds: float = 0.0  # sha256 of the base and of the output, on threads beside the fuse
    # Bytes the task fetched from the base (counted as they arrived), and how many outputs it wrote
    # from them: a batch reads each base shard once for all its outputs.
    base_bytes_read: int = 0
    outputs: int = 1


def check_stored(storage: Storage, name: str, size: int, sha256: str, rehash: bool = True) -> None:
    """Read the published object back: storage must hold exactly the bytes that were hashed (with
    `rehash` False, only as many)."""
    stored = storage.size(name)
    if stored != size:
        raise ValidationError([f"{storage.describe(name)}: storage holds {stored} bytes, the worker wrote {size}"])
    if not rehash:
        return
    digest = sha256_of(storage, name, size)
    if digest != sha256:
        raise ValidationError([f"{storage.describe(name)}: sha256 of the stored bytes is {digest}, "
                               f"the worker wrote {sha256}"])
