"""What every shard task of one job shares: one frozen value handed to each task."""

from __future__ import annotations

from dataclasses import dataclass

from merge_core.io.storage import StorageOptions
from merge_core.numerics.combine import CombineSpec
from merge_core.planning.plan import MergePlan


@dataclass(frozen=True)
class MergeSpec:
    base_uri: str
    adapter_uris: tuple[str, ...]
    output_uri: str  # the merged model being written (or, for verify, read)
    storage: StorageOptions = StorageOptions()
    device: str = "cpu"  # auto, cpu or cuda: where a task fuses, given what Ray assigned it
    allow_nonfinite: bool = False  # publish a tensor the fuse gave NaN/Inf it did not have
    read_back: bool = True  # read each published shard back and check its sha256
    sequential: bool = False  # several adapters: round after each (PEFT's merge_and_unload), not once
    combine: CombineSpec | None = None  # TIES/DARE/magnitude pruning of the adapters' deltas
    unmerge: bool = False  # take the adapters' updates back out, as PEFT's unmerge_adapter() does
    original_uri: str | None = None  # unmerge: the original base, to count what came back bit for bit

    @classmethod
    def of(cls, plan: MergePlan, output_uri: str, **settings) -> "MergeSpec":
        """The spec of a plan's merge into `output_uri`."""
        return cls(plan.base_uri, tuple(plan.adapter_uris), output_uri, sequential=plan.sequential,
                   combine=plan.combine, unmerge=plan.unmerge, **settings)
