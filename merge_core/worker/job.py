"""What every shard task of one merge job shares: one frozen value handed to each task."""

from __future__ import annotations

from dataclasses import dataclass

from merge_core.io.hashing import DEFAULT_DIGEST
from merge_core.io.storage import StorageOptions
from merge_core.numerics.arithmetic import Arithmetic
from merge_core.planning.plan import MergePlan


@dataclass(frozen=True, kw_only=True)
class MergeJob:
    base_uri: str
    adapter_uris: tuple[str, ...]
    output_uri: str  # the merged model being written (or, for verify, read)
    storage: StorageOptions = StorageOptions()
    device: str = "cpu"  # auto, cpu or cuda: where a task fuses, given what Ray assigned it
    allow_nonfinite: bool = False  # publish a tensor the fuse gave NaN/Inf it did not have
    read_back: bool = True  # read each published shard back and check its digest
    digest: str = DEFAULT_DIGEST  # the algorithm of the shards' digests (merge_core.io.hashing)
    arithmetic: Arithmetic = Arithmetic()
    original_uri: str | None = None  # unmerge: the original base, to count what came back bit for bit

    @classmethod
    def of(cls, plan: MergePlan, output_uri: str, **settings) -> "MergeJob":
        """The job of a plan's merge into `output_uri`."""
        return cls(base_uri=plan.base_uri, adapter_uris=tuple(plan.adapter_uris), output_uri=output_uri,
                   arithmetic=plan.arithmetic, **settings)
