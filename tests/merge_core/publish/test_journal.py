"""The resume journal reuses only shards proven against the same inputs."""

from __future__ import annotations

import os
import shutil

import pytest

from merge_core.errors import InputError
from merge_core.inputs.adapter import load_adapter
from merge_core.inputs.checkpoint import load_base
from merge_core.io.local import LocalStorage
from merge_core.planning.planner import plan_merge
from merge_core.publish.journal import fingerprint, proven, read_journal, write_journal
from merge_core.worker.shard_merge import merge_shard
from merge_core.worker.spec import MergeSpec
from tests.reference import make_adapter, make_base


def test_shards_of_another_base_with_the_same_layout_are_not_reused(tmp_path):
    base = make_base(str(tmp_path / "base"), seed=0)
    other = make_base(str(tmp_path / "other"), seed=5)  # same architecture, other weights
    adapter = make_adapter(str(tmp_path / "adapter"))
    out = LocalStorage(str(tmp_path / "out"))
    plan = plan_merge(load_base(LocalStorage(base)), [load_adapter(LocalStorage(adapter))], [1.0])
    results = [merge_shard(t, MergeSpec.of(plan, out.root)) for t in plan.tasks]
    key = fingerprint(plan, ["a"], {})
    write_journal(out, key, results)
    assert [r.name for r in proven(out, LocalStorage(base), read_journal(out, key).shards, plan)] == \
        [t.name for t in plan.tasks]

    # The other checkpoint, copied over the base: same names, sizes and layout, other bytes.
    for name in os.listdir(other):
        shutil.copy(os.path.join(other, name), os.path.join(base, name))
    plan_now = plan_merge(load_base(LocalStorage(base)), [load_adapter(LocalStorage(adapter))], [1.0])
    assert fingerprint(plan_now, ["a"], {}) == key, "layout alone cannot tell them apart"
    assert proven(out, LocalStorage(base), read_journal(out, key).shards, plan_now) == []


def test_a_journal_of_other_settings_is_refused(tmp_path):
    out = LocalStorage(str(tmp_path))
    write_journal(out, "one", [])
    with pytest.raises(InputError, match="the unfinished merge here had other inputs or settings"):
        read_journal(out, "two")
    with pytest.raises(InputError, match="nothing to resume"):
        read_journal(LocalStorage(str(tmp_path / "empty")), "one")
