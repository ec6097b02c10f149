"""Each validation check fails on a purpose-built bad output and passes on a good one."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_core.errors import ValidationError
from merge_core.inputs.adapter import load_adapter
from merge_core.inputs.checkpoint import load_base, read_shard_header
from merge_core.io.local import LocalStorage
from merge_core.numerics.ulps import ulp_distance
from merge_core.planning.planner import plan_merge
from merge_core.publish.finalize import build_index, validate_merge
from merge_core.publish.spot_check import spot_check
from merge_core.publish.validate import check_headers, check_index
from merge_core.publish.verify import verify_shard
from merge_core.worker.job import MergeJob
from merge_core.worker.shard_merge import merge_shard
from merge_core.worker.shard_result import check_stored
from tests.reference import make_adapter, make_base


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """A good merge (workers' results kept) that each test copies and damages."""
    root = tmp_path_factory.mktemp("validate")
    base = make_base(str(root / "base"), max_shard_size="40KB")
    adapter = make_adapter(str(root / "adapter"), target_modules=["q_proj", "up_proj"])
    plan = plan_merge(load_base(LocalStorage(base)), [load_adapter(LocalStorage(adapter))], [1.0])
    results = [merge_shard(t, MergeJob.of(plan, str(root / "out"))) for t in plan.tasks]
    return base, adapter, plan, results, str(root / "out")


def damaged_copy(merged, tmp_path) -> str:
    out = str(tmp_path / "out")
    shutil.copytree(merged[4], out)
    return out


def run_checks(merged, out: str, index: dict | None = None) -> list[str]:
    base, adapter, plan, results, _ = merged
    index = index or build_index(plan, {})[0]
    with pytest.raises(ValidationError) as info:
        validate_merge(plan, results, index, LocalStorage(base), [LocalStorage(adapter)], LocalStorage(out))
    return info.value.problems


def shard_with(plan, tensor: str) -> str:
    return next(t.name for t in plan.tasks if tensor in t.shard.header.names)


def test_good_output_passes_every_check(merged):
    base, adapter, plan, results, out = merged
    validate_merge(plan, results, build_index(plan, {})[0], LocalStorage(base), [LocalStorage(adapter)],
                   LocalStorage(out))
    for task, result in zip(plan.tasks, results):
        check_stored(LocalStorage(out), task.name, result.size, result.digest)
        verdict = verify_shard(task, MergeJob.of(plan, out), result.size, result.digest)
        assert verdict.problems == () and verdict.tensors_checked == len(task.shard.header.tensors)


def rewrite_shard(out: str, shard: str, edit) -> None:
    tensors = load_file(os.path.join(out, shard))
    edit(tensors)
    save_file(tensors, os.path.join(out, shard), metadata={"format": "pt"})


def test_missing_tensor(merged, tmp_path):
    out = damaged_copy(merged, tmp_path)
    name = "model.layers.1.mlp.down_proj.weight"
    rewrite_shard(out, shard_with(merged[2], name), lambda t: t.pop(name))
    problems = run_checks(merged, out)
    assert any(f"tensor {name} should be BF16[64, 112], found nothing" in p for p in problems)


def test_wrong_dtype(merged, tmp_path):
    out = damaged_copy(merged, tmp_path)
    name = "model.norm.weight"
    rewrite_shard(out, shard_with(merged[2], name), lambda t: t.update({name: t[name].float()}))
    assert any(f"tensor {name} should be BF16[64], found ('F32', (64,))" in p for p in run_checks(merged, out))


def test_shard_size_differs_from_what_the_worker_wrote(merged, tmp_path):
    out = damaged_copy(merged, tmp_path)
    shard = merged[2].tasks[0].name
    with open(os.path.join(out, shard), "ab") as f:
        f.write(b"\0" * 8)
    problems = run_checks(merged, out)
    assert any("storage holds" in p and "but the worker wrote" in p for p in problems)
    assert any("trailing bytes after the last tensor" in p for p in problems), "and the header check sees it too"


def test_wrong_total_size_in_the_index(merged):
    _, _, plan, _, out = merged
    index = build_index(plan, {})[0]
    _, headers = check_headers(plan, LocalStorage(out))
    assert check_index(plan, index, headers) == []
    index["metadata"]["total_size"] += 2
    assert "model.safetensors.index.json: total_size" in check_index(plan, index, headers)[0]
    index = build_index(plan, {})[0]
    index["weight_map"]["model.norm.weight"] = "elsewhere.safetensors"
    assert check_index(plan, index, headers) == ["model.safetensors.index.json: weight_map differs from the planned one"]


def test_read_back_catches_bytes_that_differ_from_what_was_hashed(merged, tmp_path):
    out = damaged_copy(merged, tmp_path)
    task, result = merged[2].tasks[0], merged[3][0]
    path = os.path.join(out, task.name)
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0x01
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValidationError, match="blake3 of the stored bytes is"):
        check_stored(LocalStorage(out), task.name, result.size, result.digest)


def test_spot_check_catches_a_wrong_fused_tensor(merged, tmp_path):
    base, adapter, plan, results, _ = merged
    out = damaged_copy(merged, tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight"
    # What a merge that forgot the scale would have written: off by far more than one ulp.
    rewrite_shard(out, shard_with(plan, name), lambda t: t.update(
        {name: load_file(os.path.join(base, shard_with(plan, name)))[name]}))
    _, headers = check_headers(plan, LocalStorage(out))
    problems = spot_check(plan, LocalStorage(base), [LocalStorage(adapter)], LocalStorage(out), headers)
    assert problems and all(f"tensor {name} row" in p and "differ from the float64 recomputation" in p
                            for p in problems)


def test_nonfinite_result_fails_the_shard_unless_allowed(tmp_path):
    base = make_base(str(tmp_path / "base"), dtype=torch.float16, max_shard_size="1MB")
    adapter = make_adapter(str(tmp_path / "adapter"), target_modules=["v_proj"], b_std=1e8)  # overflows fp16
    plan = plan_merge(load_base(LocalStorage(base)), [load_adapter(LocalStorage(adapter))], [1.0])
    (task,) = plan.tasks
    with pytest.raises(ValidationError, match=r"tensor model.layers.0.self_attn.v_proj.weight: fusing produced "
                                              r"\d+ NaN/Inf values the base did not have"):
        merge_shard(task, MergeJob.of(plan, str(tmp_path / "out")))
    assert os.listdir(tmp_path / "out") == [], "the failed shard was not published"
    result = merge_shard(task, MergeJob.of(plan, str(tmp_path / "out"), allow_nonfinite=True))
    assert dict(result.fused_stats)["model.layers.0.self_attn.v_proj.weight"].nonfinite_introduced > 0


@pytest.mark.parametrize("where", ["header", "untouched tensor", "fused tensor", "last byte"])
def test_verify_catches_one_flipped_byte_anywhere(merged, tmp_path, where):
    base, adapter, plan, results, _ = merged
    out = damaged_copy(merged, tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight"
    task = next(t for t in plan.tasks if name in t.shard.header.names)
    result = next(r for r in results if r.name == task.name)
    stored = read_shard_header(LocalStorage(out), task.name)
    fused = stored.tensor(name)
    untouched = next(t for t in stored.tensors if t.name != name)
    offset = {"header": 20, "untouched tensor": stored.data_start + untouched.start + 1,
              "fused tensor": stored.data_start + fused.start + 7, "last byte": stored.file_size - 1}[where]
    path = os.path.join(out, task.name)
    data = bytearray(open(path, "rb").read())
    data[offset] ^= 0x40
    open(path, "wb").write(bytes(data))
    verdict = verify_shard(task, MergeJob.of(plan, out), result.size, result.digest)
    assert verdict.problems, "the flipped byte was caught"
    if where == "header":  # the JSON no longer parses, or names something else
        assert "model-0000" in verdict.problems[0]
    else:
        assert any("differs from the manifest's" in p for p in verdict.problems)
    if where == "fused tensor":
        assert any(f"tensor {name}: 1 of 4096 elements differ" in p for p in verdict.problems)


def test_ulp_distance_counts_representable_steps():
    a = torch.tensor([1.0, -1.0, 0.0, 2.0], dtype=torch.bfloat16)
    steps = torch.tensor([1.0078125, -0.99609375, 9.183549615799121e-41, 2.015625], dtype=torch.bfloat16)
    assert ulp_distance(a, steps).tolist() == [1, 1, 1, 1]
    assert ulp_distance(torch.tensor([-0.0]), torch.tensor([0.0])).tolist() == [0]
    assert ulp_distance(a, a).tolist() == [0, 0, 0, 0]


def test_checks_pass_a_fan_in_fan_out_merge_and_catch_a_wrong_one(tmp_path):
    """GPT-2's Conv1D stores weights in×out: the spot check and verify follow the transpose."""
    base = make_base(str(tmp_path / "base"), "gpt2")
    adapter = make_adapter(str(tmp_path / "adapter"), "gpt2", target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    plan = plan_merge(load_base(LocalStorage(base)), [load_adapter(LocalStorage(adapter))], [1.0])
    out = str(tmp_path / "out")
    results = [merge_shard(t, MergeJob.of(plan, out)) for t in plan.tasks]
    validate_merge(plan, results, build_index(plan, {})[0], LocalStorage(base), [LocalStorage(adapter)],
                   LocalStorage(out))
    for task, result in zip(plan.tasks, results):
        verdict = verify_shard(task, MergeJob.of(plan, out), result.size,
                               result.digest)
        assert verdict.problems == ()
    name = "transformer.h.0.attn.c_attn.weight"
    rewrite_shard(out, shard_with(plan, name), lambda t: t.update({name: t[name].T.contiguous().reshape(t[name].shape)}))
    _, headers = check_headers(plan, LocalStorage(out))
    assert spot_check(plan, LocalStorage(base), [LocalStorage(adapter)], LocalStorage(out), headers)


def test_spot_check_recomputes_experts_stored_one_by_one(tmp_path):
    """LoRA on Mixtral's fused down_proj lands in per-expert w2 tensors: the spot check recomputes their
    rows from each expert's slice of lora_A and its columns of lora_B (PEFT's ΔW rounding allowed for),
    passes the merge, and catches an expert whose update went missing."""
    from peft import LoraConfig

    from tests.variant_reference import build_adapter, mixtral, save_base

    spec = mixtral()
    base = save_base(spec, str(tmp_path / "base"))
    adapter = build_adapter(spec, base, str(tmp_path / "adapter"), LoraConfig(
        r=2, lora_alpha=6, target_parameters=["mlp.experts.down_proj"]))
    plan = plan_merge(load_base(LocalStorage(base)), [load_adapter(LocalStorage(adapter))], [1.0])
    assert sum(len(t.targets) for t in plan.tasks) == 8  # 2 layers × 4 experts: all sampled
    out = str(tmp_path / "out")
    results = [merge_shard(t, MergeJob.of(plan, out)) for t in plan.tasks]
    validate_merge(plan, results, build_index(plan, {})[0], LocalStorage(base), [LocalStorage(adapter)],
                   LocalStorage(out))
    name = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    rewrite_shard(out, shard_with(plan, name), lambda t: t.update(
        {name: load_file(os.path.join(base, shard_with(plan, name)))[name]}))
    _, headers = check_headers(plan, LocalStorage(out))
    problems = spot_check(plan, LocalStorage(base), [LocalStorage(adapter)], LocalStorage(out), headers)
    assert problems and all(f"tensor {name} row" in p for p in problems)
