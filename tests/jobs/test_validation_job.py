"""Validation, verify and plan through the command, and the driver's progress display."""

from __future__ import annotations

import io
import json
import math
import os
import time

import pytest
import torch

from jobs.progress import Progress
from merge_core.format.header import encode_header
from merge_core.inputs.checkpoint import read_shard_header
from merge_core.io.local import LocalStorage
from merge_core.names import INDEX_NAME
from tests.jobs.conftest import cli
from tests.reference import make_adapter, make_base


def test_verify_passes_a_good_merge_and_names_the_tensor_a_flipped_byte_hit(models, ray_session, tmp_path):
    cluster, _ = ray_session
    out = str(tmp_path / "merged")
    common = ("--base", models.base, "--adapter", models.adapter, "--ray-address", cluster.address)
    assert cli("merge", *common, "--output", out).returncode == 0
    good = cli("verify", *common, "--merged", out)
    assert good.returncode == 0, good.stderr
    assert "no problems" in good.stdout

    name = "model.layers.1.mlp.up_proj.weight"
    shard = json.load(open(os.path.join(out, INDEX_NAME)))["weight_map"][name]
    info = read_shard_header(LocalStorage(out), shard)
    offset = info.data_start + info.tensor(name).start + 1001
    data = bytearray(open(os.path.join(out, shard), "rb").read())
    data[offset] ^= 0x10
    open(os.path.join(out, shard), "wb").write(bytes(data))
    bad = cli("verify", *common, "--merged", out, "--report", str(tmp_path / "verify.json"))
    assert bad.returncode == 4
    assert bad.stderr.count("error: validation failed:") == 1
    assert f"tensor {name}: 1 of 7168 elements differ" in bad.stderr
    problems = json.load(open(tmp_path / "verify.json"))["problems"]
    assert any("differs from the manifest's" in p for p in problems)


@pytest.mark.parametrize("layout", ["sharded", "single file"])
def test_a_merge_that_produces_inf_exits_4_and_publishes_nothing(ray_session, tmp_path, layout):
    cluster, _ = ray_session
    base = make_base(str(tmp_path / "base"), dtype=torch.float16,
                     max_shard_size="60KB" if layout == "sharded" else "50MB")
    adapter = make_adapter(str(tmp_path / "adapter"), target_modules=["o_proj"], b_std=1e8)
    out = tmp_path / "out"
    run = cli("merge", "--base", base, "--adapter", adapter, "--output", str(out), "--ray-address",
                  cluster.address)
    assert run.returncode == 4, run.stderr
    assert "self_attn.o_proj.weight: fusing produced" in run.stderr and "--allow-nonfinite" in run.stderr
    assert "Traceback" not in run.stderr and "ray::" not in run.stderr, "the worker's error, not Ray's wrapping"
    assert not (out / INDEX_NAME).exists() and not (out / "model.safetensors").exists(), \
        "nothing a loader would pick up"
    assert not [n for n in os.listdir(out) if n.endswith(".partial")]
    run = cli("merge", "--base", base, "--adapter", adapter, "--output", str(out), "--ray-address",
                  cluster.address, "--overwrite", "--allow-nonfinite")
    assert run.returncode == 0, run.stderr


LLAMA_405B = dict(hidden=16384, intermediate=53248, layers=126, kv=1024, vocab=128256)


def write_header_only(path: str, tensors: list[tuple[str, str, tuple[int, ...]]]) -> None:
    """A real safetensors header, the data left as a hole in a sparse file."""
    header, infos = encode_header(tensors, {"format": "pt"})
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + (infos[-1].end if infos else 0))


def pack(tensors, per_shard: int) -> list[list[tuple[str, str, tuple[int, ...]]]]:
    shards, size = [[]], 0
    for name, shape in tensors:
        if size + 2 * math.prod(shape) > per_shard and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append((name, "BF16", shape))
        size += 2 * math.prod(shape)
    return shards


def synthetic_405b(root) -> tuple[str, str]:
    h, i, kv, vocab = (LLAMA_405B[k] for k in ("hidden", "intermediate", "kv", "vocab"))
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    tensors = [("model.embed_tokens.weight", (vocab, h))]
    for layer in range(LLAMA_405B["layers"]):
        tensors += [(f"model.layers.{layer}.{m}.weight", s) for m, s in shapes.items()]
        tensors += [(f"model.layers.{layer}.input_layernorm.weight", (h,)),
                    (f"model.layers.{layer}.post_attention_layernorm.weight", (h,))]
    tensors += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    per_shard = math.ceil(sum(2 * math.prod(s) for _, s in tensors) / 191)
    while len(shards := pack(tensors, per_shard)) > 191:  # as Meta's release: 191 shards
        per_shard = int(per_shard * 1.01)
    base = root / "llama-405b"
    base.mkdir()
    weight_map = {}
    for number, shard in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        write_header_only(str(base / file), shard)
        weight_map.update({name: file for name, _, _ in shard})
    (base / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (base / "config.json").write_text("{}")
    adapter = root / "lora"
    adapter.mkdir()
    lora = []
    for layer in range(LLAMA_405B["layers"]):
        for module, (out_f, in_f) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            lora += [(f"{key}.lora_A.weight", "F32", (16, in_f)), (f"{key}.lora_B.weight", "F32", (out_f, 16))]
    write_header_only(str(adapter / "adapter_model.safetensors"), lora)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32,
                                                             "target_modules": ["q_proj", "k_proj"]}))
    return str(base), str(adapter)


def test_plan_of_a_405b_scale_checkpoint_from_headers_alone(tmp_path):
    base, adapter = synthetic_405b(tmp_path)
    assert len(os.listdir(base)) == 193
    started = time.monotonic()
    run = cli("plan", "--base", base, "--adapter", adapter, "--json")
    elapsed = time.monotonic() - started
    assert run.returncode == 0, run.stderr
    plan = json.loads(run.stdout)
    assert plan["tasks"] == 191 and plan["fused_tensors"] == 126 * 7
    assert sum(len(s["fused"][adapter]) for s in plan["shards"]) == 882
    assert sum(s["tensors"] for s in plan["shards"]) == 126 * 9 + 3
    assert 800e9 < plan["write_bytes"] < 820e9
    assert all(s["resources"]["num_cpus"] == 1 and s["resources"]["memory"] > 0 for s in plan["shards"])
    print(f"plan of 191 shards / {sum(s['tensors'] for s in plan['shards'])} tensors took {elapsed:.1f} s")

    text = cli("plan", "--base", base, "--adapter", adapter)
    assert text.returncode == 0
    assert text.stdout.splitlines()[0] == (f"base {base}: 191 shards, 882 tensors to fuse, "
                                           f"read {plan['read_bytes'] / 1e9:.2f} GB, "
                                           f"write {plan['write_bytes'] / 1e9:.2f} GB")
    assert len(text.stdout.splitlines()) == 191 + 3
    assert not [n for n in os.listdir(base) if n.startswith(".")], "plan writes nothing"


def test_progress_draws_a_live_bar_on_a_terminal():
    stream = io.StringIO()
    progress = Progress(4, 4_000_000_000, stream=stream, live=True)
    progress.shard_done("a", 1_000_000_000, "")
    progress.retry("b", "TransientStorageError: SlowDown", 2)
    progress.shard_done("b", 1_000_000_000, "")
    progress.close()
    text = stream.getvalue()
    assert "2/4 shards" in text and "2.00/4.00 GB" in text and "retries 1" in text and "ETA" in text
