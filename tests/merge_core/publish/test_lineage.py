"""Which adapters a merged model holds, read back through its chain of manifests."""

from __future__ import annotations

import pytest

from merge_core.errors import InputError
from merge_core.publish.lineage import check_not_merged_twice, held_adapters, unrecorded


def record(sha: str, uri: str) -> dict:
    return {"uri": uri, "given_as": uri, "files": [{"name": "adapter_config.json", "sha256": "c" + sha},
                                                   {"name": "adapter_model.safetensors", "sha256": sha}]}


def manifest(adapters, base: str, created: str, lineage=None, unmerge: bool = False) -> dict:
    return {"adapters": adapters, "base": {"uri": base}, "created": created, "lineage": lineage,
            "arithmetic": {"operation": "unmerge"} if unmerge else {"rounding": "once"}}


def test_merges_add_adapters_and_unmerges_take_them_out_through_the_chain():
    first = manifest([record("a", "s3://l/a"), record("b", "s3://l/b")], "s3://m/base", "2026-11-01T00:00:00")
    second = manifest([record("b", "s3://l/b-copy")], "s3://m/ab", "2026-11-02T00:00:00", first, unmerge=True)
    third = manifest([record("c", "s3://l/c")], "s3://m/a", "2026-11-03T00:00:00", second)
    held = held_adapters(third)
    assert sorted(held) == ["a", "c"] and held["a"].merged_into == "s3://m/base"
    assert unrecorded(third, [record("b", "x"), record("c", "y")]) == ["x"]
    assert unrecorded(None, [record("b", "x")]) == [], "no manifest: nothing to check against"


def test_a_second_merge_of_the_same_weights_is_refused_naming_the_first():
    held = manifest([record("a", "s3://l/a")], "s3://m/base", "2026-11-01T00:00:00")
    with pytest.raises(InputError) as error:
        check_not_merged_twice("s3://m/merged", held, [record("a", "/copy/of/a")], allow_remerge=False)
    assert str(error.value) == ("/copy/of/a: is already merged into s3://m/merged: its weights are those of s3://l/a, "
                                "merged into s3://m/base on 2026-11-01 (s3://m/merged/merge_manifest.json) (merge "
                                "into the original base, or pass --allow-remerge to add it a second time)")
    check_not_merged_twice("s3://m/merged", held, [record("a", "/copy/of/a")], allow_remerge=True)
    check_not_merged_twice("s3://m/merged", held, [record("z", "/other")], allow_remerge=False)
