"""What the command's tests of quantized bases share: an adapter made on a base's dequantized twin, a base
damaged in place (a tensor replaced or dropped), and one S3 to S3 merge with fresh scales followed by verify,
plan and unmerge."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from merge_core.names import INDEX_NAME
from tests.conftest import BUCKET, list_keys, open_uploads, upload_dir
from tests.jobs.conftest import cli
from tests.jobs.test_bad_input import shard_of
from tests.quantized_merges import exact_base
from tests.quantized_models import decode_checkpoint
from tests.variant_reference import build_adapter


def adapter_on(checkpoint, root, name: str, resize: int | None = None, **lora) -> str:
    """A LoRA on the tests' Llama, made on the base's exact float32 twin."""
    from peft import LoraConfig
    from transformers import LlamaForCausalLM
    twin = exact_base(checkpoint, str(root / f"{name}-twin"))
    return build_adapter((LlamaForCausalLM, None), twin, str(root / name), LoraConfig(r=4, lora_alpha=8, **lora),
                         resize=resize)


def replace_tensor(base: str, name: str, value: torch.Tensor) -> None:
    path = shard_of(base, name)
    tensors = load_file(path)
    tensors[name] = value
    save_file(tensors, path, metadata={"format": "pt"})


def drop_tensor(base: str, name: str) -> None:
    """The tensor gone from its shard and the index, as a botched conversion leaves it."""
    path = shard_of(base, name)
    tensors = load_file(path)
    del tensors[name]
    save_file(tensors, path, metadata={"format": "pt"})
    index_path = os.path.join(base, INDEX_NAME)
    index = json.load(open(index_path))
    del index["weight_map"][name]
    json.dump(index, open(index_path, "w"))


def fresh_round_trip(s3, cluster, checkpoint, adapter: str, tmp_path, prefix: str, fmt: str, *options: str
                     ) -> tuple[list[str], str]:
    """The Llama `checkpoint` with a LoRA on q_proj and gate_proj merged S3 to S3 with fresh scales (q/k/v tied
    in the manifest), verified from the record, planned (`fmt` in the plan's words, k_proj requantized beside
    q_proj) and unmerged to a local folder, whose q_proj comes back near the base's. Returns (the merged keys
    on S3, the unmerged folder)."""
    base_uri = upload_dir(s3, checkpoint.path, f"{prefix}/base")
    adapter_uri = upload_dir(s3, adapter, f"{prefix}/adapter")
    out = f"s3://{BUCKET}/{prefix}/out"
    ray = ["--ray-address", cluster.address]
    run = cli("merge", "--base", base_uri, "--adapter", adapter_uri, "--output", out, "--scales", "fresh", *options,
              *ray)
    assert run.returncode == 0, run.stderr
    assert "adapter kept" in run.stdout
    keys = list_keys(s3, f"{prefix}/out")
    assert INDEX_NAME in keys and open_uploads(s3, f"{prefix}/out") == []
    manifest = json.loads(s3.client().get_object(Bucket=BUCKET, Key=f"{prefix}/out/merge_manifest.json")["Body"].read())
    assert manifest["requantization"]["scales"] == "fresh"
    assert [f"model.layers.0.self_attn.{p}_proj.weight" for p in "kqv"] in manifest["requantization"]["tied"]
    verified = cli("verify", "--base", base_uri, "--adapter", adapter_uri, "--merged", out, *ray)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    planned = cli("plan", "--base", base_uri, "--adapter", adapter_uri, "--json", "--scales", "fresh")
    assert planned.returncode == 0, planned.stderr
    shown = json.loads(planned.stdout)
    assert shown["scales"] == "fresh" and fmt in shown["quantization"]
    requantized = {t for shard in shown["shards"] for t in shard["requantized"]}
    assert "model.layers.0.self_attn.k_proj.weight" in requantized  # a sibling merged with q_proj
    back = str(tmp_path / "unmerged")
    undone = cli("unmerge", "--merged", out, "--adapter", adapter_uri, "--output", back, *ray)
    assert undone.returncode == 0, undone.stderr
    assert json.load(open(os.path.join(back, "merge_manifest.json")))["requantization"]["scales"] == "fresh"
    merged_local = str(tmp_path / "merged")
    assert cli("merge", "--base", base_uri, "--adapter", adapter_uri, "--output", merged_local, "--scales", "fresh",
               *ray).returncode == 0
    base, merged, unmerged = (decode_checkpoint(p) for p in (checkpoint.path, merged_local, back))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (unmerged[q] - base[q]).norm() < 0.5 * (merged[q] - base[q]).norm()  # the update taken back out
    return keys, back
