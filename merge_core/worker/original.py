"""The original base an unmerge is measured against, and restores from: one of its shards, its
header read once, its tensors read on demand."""

from __future__ import annotations

import dataclasses
import json

from merge_core.errors import InputError
from merge_core.format.tensors import tensor_from_bytes
from merge_core.inputs.checkpoint import read_shard_header
from merge_core.io.registry import open_storage
from merge_core.names import INDEX_NAME, SINGLE_NAME
from merge_core.numerics.stats import FuseStats
from merge_core.numerics.ulps import ulp_distance
from merge_core.worker.job import MergeJob


class OriginalShard:
    """The original's tensors that a merged shard holds, wherever the original stores them (its shards
    need not be cut as the merged model's are): found through its index, each shard's header read once."""

    def __init__(self, job: MergeJob, name: str):
        self.storage = open_storage(job.original_uri, job.storage)
        self.weight_map = _weight_map(self.storage, name)
        self.headers: dict = {}

    def _locate(self, tensor: str):
        shard = self.weight_map.get(tensor)
        if shard is None:
            return None, None
        if shard not in self.headers:
            self.headers[shard] = read_shard_header(self.storage, shard)
        header = self.headers[shard]
        return shard, (header.tensor(tensor) if tensor in header.names else None)

    def read(self, tensor: str) -> bytes | None:
        """The tensor's bytes as the original stores them, None where it has no such tensor."""
        shard, info = self._locate(tensor)
        if info is None:
            return None
        return self.storage.read_range(shard, self.headers[shard].data_start + info.start, info.nbytes)

    def restore(self, tensor: str, dtype: str, shape: tuple[int, ...]) -> bytes:
        """The original's copy of a tensor an unmerge cannot compute (DoRA, a whole copy)."""
        shard, info = self._locate(tensor)
        if info is None or (info.dtype, tuple(info.shape)) != (dtype, tuple(shape)):
            raise InputError(f"{self.storage.describe(shard or INDEX_NAME)}: tensor {tensor}",
                             f"is not the {dtype}{list(shape)} tensor the merged model holds",
                             "give as --base the checkpoint the merged model was made from")
        return self.read(tensor)

    def compare(self, tensor: str, merged: memoryview, stats: FuseStats) -> FuseStats:
        """`stats` with how much of the original an unmerged tensor got back."""
        raw = self.read(tensor)
        if raw is None or len(raw) != len(merged):
            return stats
        info = self._locate(tensor)[1]
        original = tensor_from_bytes(raw, info.dtype, info.shape)
        ours = tensor_from_bytes(merged, info.dtype, info.shape)
        if not ours.is_floating_point():
            return dataclasses.replace(stats, recovered_equal=int((ours == original).sum()), recovered_max_ulps=None)
        ulps = ulp_distance(ours, original)
        return dataclasses.replace(stats, recovered_equal=int((ulps == 0).sum()),
                                   recovered_max_ulps=int(ulps.max()) if ulps.numel() else 0)


def _weight_map(storage, fallback: str) -> dict[str, str]:
    """tensor → shard of the original: its index, or its single file."""
    if storage.exists(INDEX_NAME):
        index = json.loads(storage.read_bytes(INDEX_NAME))
        return dict(index.get("weight_map") or {})
    name = SINGLE_NAME if storage.exists(SINGLE_NAME) else fallback
    if not storage.exists(name):
        return {}
    return {info.name: name for info in read_shard_header(storage, name).tensors}
