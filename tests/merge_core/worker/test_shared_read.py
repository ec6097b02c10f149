"""A batch: several outputs from one read of the base, each exactly what its own merge writes.

The product's batch driver, shard tasks and final tasks run in this process (jobs.executor.
InProcessExecutor); the base's bytes are counted where the local storage reads them.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter

import pytest

from jobs.api import options_for, run_batch_job
from jobs.executor import InProcessExecutor
from jobs.options import BatchOptions
from merge_core.errors import InputError
from merge_core.io.local import LocalStorage
from merge_core.names import CLAIM_NAME, INDEX_NAME, JOURNAL_NAME, MANIFEST_NAME
from merge_core.planning.plan import shared_memory_bytes
from tests.local_merge import merge_without_ray
from tests.quantized_models import save_fp8_llama
from tests.reference import assert_bit_identical, load_checkpoint, make_adapter, make_base, peft_merged
from tests.variant_reference import build_adapter


def batch(base: str, outputs: list[dict], **options):
    return run_batch_job(options_for(BatchOptions, base=base, outputs=outputs, **options), InProcessExecutor())


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """A base in five shards, three adapters of their own ranks and targets, and PEFT's merge of each."""
    root = tmp_path_factory.mktemp("three")
    base = make_base(str(root / "base"), max_shard_size="40KB")
    adapters = [make_adapter(str(root / "a0"), seed=1, r=4),
                make_adapter(str(root / "a1"), seed=2, r=8, lora_alpha=8, use_rslora=True),
                make_adapter(str(root / "a2"), seed=3, r=2, target_modules=["q_proj", "down_proj"])]
    references = [peft_merged(base, a, str(root / f"peft{i}")) for i, a in enumerate(adapters)]
    return root, base, adapters, references


@pytest.fixture
def counted(monkeypatch):
    """Bytes read from each file of the local storage while a shard task runs, by (folder, name)."""
    reads: Counter = Counter()
    in_task = []
    original = LocalStorage.read_into

    def read_into(self, name, offset, view):
        if in_task:
            reads[(self.root, name)] += len(view)
        original(self, name, offset, view)

    import jobs.shared_shards as shared_shards
    task = shared_shards.merge_outputs_work

    def counting_task(*args):
        in_task.append(1)
        try:
            return task(*args)
        finally:
            in_task.pop()

    monkeypatch.setattr(LocalStorage, "read_into", read_into)
    monkeypatch.setattr(shared_shards, "merge_outputs_work", counting_task)
    return reads


def test_three_adapters_into_three_outputs_from_one_read_of_each_shard(three, counted, tmp_path):
    root, base, adapters, references = three
    outs = [str(tmp_path / f"out{i}") for i in range(3)]
    summary = batch(base, [{"output": o, "adapters": [a]} for o, a in zip(outs, adapters)])

    assert summary.ok, [str(o.error) for o in summary.failed]
    for out, reference in zip(outs, references):
        assert_bit_identical(load_checkpoint(out), reference)
    shards = sorted(set(json.load(open(os.path.join(base, INDEX_NAME)))["weight_map"].values()))
    sizes = {name: os.path.getsize(os.path.join(base, name)) for name in shards}
    assert len(shards) >= 4 and summary.tasks == len(shards), "one task per base shard, for all three outputs"
    read = {name: n for (folder, name), n in counted.items() if folder == os.path.realpath(base)}
    assert read == sizes, "each base shard read once, whole, for the three outputs"
    assert summary.bytes_read == summary.base_bytes == sum(sizes.values())
    for out in outs:
        manifest = json.load(open(os.path.join(out, MANIFEST_NAME)))
        assert {s["name"]: (s["base_bytes_read"], s["outputs"]) for s in manifest["output"]["shards"]} == {
            name: (size, 3) for name, size in sizes.items()}
        assert not {JOURNAL_NAME, CLAIM_NAME} & set(os.listdir(out))


def test_each_output_is_what_its_own_merge_writes_whatever_its_options(tmp_path):
    """An FP8 base: one output kept in FP8, one with fresh scales, one dequantized to bf16, one of
    another adapter; each output's files are byte for byte those of its own merge (the manifest apart: its times)."""
    checkpoint = save_fp8_llama(str(tmp_path / "base"))
    from peft import LoraConfig
    from transformers import LlamaForCausalLM

    adapters = [build_adapter((LlamaForCausalLM, None), checkpoint.path, str(tmp_path / f"a{i}"), LoraConfig(
        r=4, lora_alpha=8, target_modules=targets)) for i, targets in enumerate([["q_proj", "v_proj", "down_proj"],
                                                                                   ["k_proj", "up_proj"]])]
    wanted = [{"adapters": [adapters[0]]}, {"adapters": [adapters[0]], "scales": "fresh"},
              {"adapters": [adapters[0]], "dequantize": True},
              {"adapters": [adapters[1], adapters[0]], "weights": [0.5, 2.0]}]
    outs = [{"output": str(tmp_path / f"batch{i}")} | w for i, w in enumerate(wanted)]
    assert batch(checkpoint.path, outs).ok
    for i, w in enumerate(wanted):
        alone = str(tmp_path / f"alone{i}")
        merge_without_ray(checkpoint.path, w["adapters"], alone, weights=w.get("weights"),
                          dequantize=w.get("dequantize", False), scales=w.get("scales", "keep"))
        names = sorted(os.listdir(alone))
        assert sorted(os.listdir(outs[i]["output"])) == names
        for name in (n for n in names if n != MANIFEST_NAME):
            assert open(os.path.join(alone, name), "rb").read() == open(os.path.join(outs[i]["output"], name),
                                                                         "rb").read(), (i, name)
    shards = [n for n in os.listdir(outs[0]["output"]) if n.endswith(".safetensors")]
    assert any(open(os.path.join(outs[0]["output"], n), "rb").read() != open(os.path.join(outs[1]["output"], n),
                                                                            "rb").read() for n in shards)  # fresh


def test_an_outputs_failure_is_its_own_and_resume_finishes_it(three, tmp_path, monkeypatch):
    """One output is held by another job, one fails writing its third shard: the third is published;
    the others are reported with their errors. Once the claim is gone, --resume finishes both,
    reusing the shards that had landed, and finds the third complete."""
    root, base, adapters, references = three
    outs = [str(tmp_path / f"out{i}") for i in range(3)]
    os.makedirs(outs[0])
    with open(os.path.join(outs[0], CLAIM_NAME), "w") as f:  # a live job of this host: this very process
        json.dump({"run": "other", "host": os.uname().nodename, "pid": os.getpid(), "command": "merge",
                   "started": time.time(), "until": time.time() + 600}, f)
    writes = Counter()
    original = LocalStorage.open_writer

    def failing(self, name):
        if self.root == os.path.realpath(outs[1]) and name.endswith(".safetensors"):
            writes[name] += 1
            if len(writes) == 3:
                raise PermissionError(13, "Permission denied", name)
        return original(self, name)

    monkeypatch.setattr(LocalStorage, "open_writer", failing)
    entries = [{"output": o, "adapters": [a]} for o, a in zip(outs, adapters)]
    summary = batch(base, entries)
    assert [o.ok for o in summary.outputs] == [False, False, True]
    assert isinstance(summary.outputs[0].error, InputError)
    assert "another job is writing" in str(summary.outputs[0].error)
    assert "Permission denied" in str(summary.outputs[1].error)
    assert_bit_identical(load_checkpoint(outs[2]), references[2])
    assert os.listdir(outs[0]) == [CLAIM_NAME], "the held output was not touched"
    assert INDEX_NAME not in os.listdir(outs[1]) and JOURNAL_NAME in os.listdir(outs[1])

    monkeypatch.setattr(LocalStorage, "open_writer", original)
    os.remove(os.path.join(outs[0], CLAIM_NAME))
    again = batch(base, entries, resume=True)
    assert again.ok and again.outputs[2].summary.already_complete
    assert again.outputs[1].summary.reused == 2, "the shards landed before the failure were reused"
    for out, reference in zip(outs, references):
        assert_bit_identical(load_checkpoint(out), reference)


def test_the_double_merge_guard_holds_for_each_output(three, tmp_path):
    root, base, adapters, references = three
    first = str(tmp_path / "first")
    assert batch(base, [{"output": first, "adapters": [adapters[0]]}]).ok
    summary = batch(first, [{"output": str(tmp_path / "twice"), "adapters": [adapters[0]]},
                            {"output": str(tmp_path / "then"), "adapters": [adapters[1]]}])
    assert not summary.outputs[0].ok and "already" in str(summary.outputs[0].error)
    assert not os.path.exists(tmp_path / "twice") and summary.outputs[1].ok
    assert json.load(open(tmp_path / "then" / MANIFEST_NAME))["lineage"]["adapters"][0]["uri"] == adapters[0]


def test_a_tasks_memory_does_not_grow_with_the_number_of_outputs(three):
    from jobs.options import outputs_of
    from jobs.prepare import prepare

    root, base, adapters, references = three
    plans = [prepare(m).plan for m in outputs_of(options_for(BatchOptions, base=base, outputs=[
        {"output": f"/tmp/o{i}", "adapters": [a]} for i, a in enumerate(adapters)]))]
    for shard in range(len(plans[0].tasks)):
        tasks = [p.tasks[shard] for p in plans]
        assert shared_memory_bytes(tasks * 10) == shared_memory_bytes(tasks) > max(t.memory_bytes for t in tasks)
