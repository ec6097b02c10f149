"""PEFT's float32 merge as the reference for merges into quantized bases, and a merge that must keep the
base's layout: what tests/merge_core/worker's quantized tests share.

The reference merge is PEFT's own merge_and_unload, in float32, into a model whose quantized weights hold
the float32 values their format's library decompresses them to: W' there has the bits lora-merge's
float32 fuse gives.
"""

from __future__ import annotations

import json
import warnings
from typing import Callable, Collection

import pyarrow.parquet as pq
import torch

from tests.local_merge import merge_without_ray
from tests.quantized_models import quantized_weights, read_config, stored_tensors, write_sharded
from tests.reference import load_checkpoint
from tests.variant_reference import build_adapter

LORA_ON = ["q_proj", "gate_proj", "down_proj"]  # k/v and up stay untouched beside touched siblings


def llama_cls():
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM


def lora(**extra):
    from peft import LoraConfig
    return LoraConfig(r=4, lora_alpha=8, **extra)


def exact_base(checkpoint, path: str) -> str:
    """The base with its quantized weights' float32 values, bf16 elsewhere, no quantization_config."""
    config = read_config(checkpoint.path)
    config.pop("quantization_config", None)
    if config.get("text_config", {}).pop("quantization_config", None) is not None and not config["text_config"]:
        del config["text_config"]  # it held the quantization_config only
    tensors = {name: t.float() for name, t in checkpoint.dequantized.items()} | dict(checkpoint.exact)
    return write_sharded(path, tensors, config, shards=1)


def peft_float32(model_cls, base: str, adapter: str, out: str) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(model_cls.from_pretrained(base, dtype=torch.float32),
                                           adapter).merge_and_unload()
        merged.save_pretrained(out)
    return load_checkpoint(out)


def reference_case(checkpoint, model_cls, peft_config, root) -> tuple[str, dict[str, torch.Tensor]]:
    """(an adapter trained on the decompressed base, PEFT's float32 merge of it)."""
    exact = exact_base(checkpoint, str(root / "exact"))
    adapter = build_adapter((model_cls, None), exact, str(root / "adapter"), peft_config)
    return adapter, peft_float32(model_cls, exact, adapter, str(root / "peft"))


def merged_in_format(checkpoint, adapter: str, out: str, **options) -> tuple[dict, dict]:
    """(the base's stored tensors, the merge's): the same names, dtypes and shapes, config.json unchanged."""
    merge_without_ray(checkpoint.path, [adapter], out, **options)
    base, merged = stored_tensors(checkpoint.path), stored_tensors(out)
    assert {k: (v.dtype, v.shape) for k, v in merged.items()} == {k: (v.dtype, v.shape) for k, v in base.items()}
    assert read_config(out) == read_config(checkpoint.path), "config.json unchanged"
    return base, merged


def requantized_as_expected(checkpoint, adapter: str, reference: dict[str, torch.Tensor], out: str, scales: str,
                            expected_parts: Callable, modules: Collection[str]) -> dict:
    """Merge in format and compare every stored part of the quantized `modules` (the activations' scales too)
    with `expected_parts(checkpoint, base, reference, touched, scales)` (the reference's requantization of
    PEFT's merge, by stored name), or with the base's bytes where that has none; returns the manifest's
    `requantization`."""
    base, merged = merged_in_format(checkpoint, adapter, out, scales=scales)
    touched = {n for n in checkpoint.exact if not torch.equal(reference[n], checkpoint.exact[n])}
    assert touched and len(touched) < len(checkpoint.exact), "the adapter updates some quantized weights, not all"
    expected = expected_parts(checkpoint, base, reference, touched, scales)
    assert {n.rsplit(".", 1)[0] for n in expected} >= {n.rsplit(".", 1)[0] for n in touched}
    for stored in (n for n in base if n.rsplit(".", 1)[0] in modules):
        want = expected.get(stored, base[stored])
        assert torch.equal(merged[stored].reshape(-1).view(torch.uint8),
                           want.reshape(-1).contiguous().view(torch.uint8)), (stored, scales)
    rows = {row["name"]: row for row in pq.read_table(f"{out}/merge_report.parquet").to_pylist()}
    for name in touched:  # a row each, fused siblings too, with what survived of the update
        assert rows[name]["fused"] and rows[name]["adapter_kept"] is not None, (name, rows[name])
    with open(f"{out}/merge_manifest.json") as f:
        requantization = json.load(f)["requantization"]
    assert requantization["scales"] == scales
    return requantization


def dequantized_as_peft(checkpoint, adapter: str, reference: dict[str, torch.Tensor], out: str
                        ) -> dict[str, torch.Tensor]:
    """--dequantize: every quantized weight PEFT's float32 merge rounded to bf16, no stored part of a quantized
    weight left, no quantization_config (at the top or in text_config); returns the merge's tensors."""
    merge_without_ray(checkpoint.path, [adapter], out, dequantize=True)
    merged = load_checkpoint(out)
    config = read_config(out)
    assert "quantization_config" not in config and "quantization_config" not in config.get("text_config", {})
    parts = {info.name for weight in quantized_weights(checkpoint.path).values() for _, info in weight.parts}
    assert not (parts - set(checkpoint.exact)) & set(merged), "no scales or packed codes left"
    for logical in checkpoint.exact:
        assert torch.equal(merged[logical], reference[logical].to(torch.bfloat16)), logical
    return merged


def spot_check_finds_the_base_codes(checkpoint, adapter: str, out: str) -> None:
    """The final task's float64 check decodes a requantized weight's stored parts and passes the merge; with the
    base's codes put back in place (the update lost) it finds rows more than one step of the format away."""
    from merge_core.inputs.adapter import load_adapter
    from merge_core.inputs.checkpoint import load_base, read_shard_header
    from merge_core.io.registry import open_storage
    from merge_core.planning.planner import plan_merge
    from merge_core.publish.spot_check import _Sources, _spot_quantized
    from merge_core.worker.job import MergeJob
    from merge_core.worker.shard_merge import merge_shard

    plan = plan_merge(load_base(open_storage(checkpoint.path)), [load_adapter(open_storage(adapter))], [1.0])
    for task in plan.tasks:
        merge_shard(task, MergeJob.of(plan, out))
    task, target = next((t, f) for t in plan.tasks for f in t.targets if f.quantized is not None and f.updates)
    rows = [0, target.quantized.shape[0] - 1]
    storages = (open_storage(checkpoint.path), [open_storage(adapter)], open_storage(out))
    header = read_shard_header(storages[2], task.name)
    assert _spot_quantized(task, target, rows, _Sources(*storages, header)) == []
    codes = header.tensor(target.parts[0].info.name)
    source = target.parts[0]
    original = storages[0].read_range(source.shard, source.data_start + source.info.start, source.info.nbytes)
    path = f"{out}/{task.name}"
    with open(path, "rb") as f:
        written = f.read()
    at = header.data_start + codes.start
    with open(path, "wb") as f:
        f.write(written[:at] + original + written[at + codes.nbytes:])  # the base's codes back, in place
    problems = _spot_quantized(task, target, rows, _Sources(*storages, read_shard_header(storages[2], task.name)))
    assert problems and f"tensor {target.tensor} row " in problems[0] and "step" in problems[0]
