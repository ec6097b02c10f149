"""What the driver hands the final task besides the plan. Free of torch: the driver builds it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from merge_core.worker.shard_result import ShardResult


@dataclass(frozen=True, kw_only=True)
class Publication:
    """What the final task publishes besides the plan: the shards' results and the run's record."""
    results: tuple[ShardResult, ...]
    extra_files: tuple[str, ...]  # the base's non-weight files
    index_metadata: Mapping[str, object]  # the base index's metadata
    adapter_records: tuple[Mapping[str, object], ...]  # for the manifest
    timings: Mapping[str, float] = field(default_factory=dict)
    cluster: Mapping[str, object] = field(default_factory=dict)
    retries: Mapping[str, int] = field(default_factory=dict)
    retry_reasons: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # shard -> why each retry
    reused: tuple[str, ...] = ()  # shards a --resume took from the interrupted run
    lineage: Mapping[str, object] | None = None  # the input model's own manifest, when it has one
    original_uri: str | None = None  # unmerge: the original base its result was compared with
    fingerprint: str = ""  # the merge's (inputs, updates, settings): a re-run that finds it done does nothing
    final_retries: tuple[str, ...] = ()  # why earlier attempts of the final task failed
