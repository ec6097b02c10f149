"""The whole job through the `lora-merge` command: Ray tasks, the final task, the published output."""

from __future__ import annotations

import hashlib
import json
import os

import blake3
import pyarrow.parquet as pq
import pytest

from merge_core.names import INDEX_NAME, MANIFEST_NAME, REPORT_NAME
from tests.jobs.conftest import cli
from tests.reference import assert_bit_identical, load_checkpoint


def sha256(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def b3(path: str) -> str:
    return blake3.blake3(open(path, "rb").read()).hexdigest()


def test_merge_equals_peft_and_publishes_a_complete_checkpoint(models, ray_session, tmp_path):
    """(The command as a process of its own that starts a local Ray for its job: the S3 fault tests
    in test_faults.py and test_interrupts.py, and the Ray Jobs test in test_job_spec.py.)"""
    out, report = str(tmp_path / "merged"), str(tmp_path / "report.json")
    run = cli("merge", "--base", models.base, "--adapter", models.adapter, "--output", out, "--report", report)
    assert run.returncode == 0, run.stderr
    assert_bit_identical(load_checkpoint(out), models.reference)

    base_index = json.load(open(os.path.join(models.base, INDEX_NAME)))
    index = json.load(open(os.path.join(out, INDEX_NAME)))
    assert index["weight_map"] == base_index["weight_map"]
    assert index["metadata"]["total_size"] == base_index["metadata"]["total_size"]
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert sha256(os.path.join(out, name)) == sha256(os.path.join(models.base, name))
    assert not [n for n in os.listdir(out) if n.startswith(".")], "no temporary files left behind"

    manifest = json.load(open(os.path.join(out, MANIFEST_NAME)))
    shards = {s["name"]: s for s in manifest["output"]["shards"]}
    assert set(shards) == set(base_index["weight_map"].values())
    for name, shard in shards.items():
        assert shard["blake3"] == b3(os.path.join(out, name))  # b3sum's digest of the file
        assert shard["size"] == os.path.getsize(os.path.join(out, name))
    for shard in manifest["base"]["shards"]:
        assert shard["blake3"] == b3(os.path.join(models.base, shard["name"]))
    assert manifest["digest"] == "blake3"
    adapter = manifest["adapters"][0]
    assert adapter["config"]["use_rslora"] is True and adapter["weight"] == 1.0
    assert adapter["files"][1]["sha256"] == sha256(os.path.join(models.adapter, "adapter_model.safetensors"))
    assert manifest["fused_tensor_count"] == sum(len(s["fused_tensors"]) for s in shards.values()) == 14
    assert {f["name"] for f in manifest["output"]["files"]} == {"config.json", "generation_config.json",
                                                                "tokenizer_config.json"}

    summary = json.load(open(report))
    assert summary["fused_tensors"] == 14 and summary["shards"] == len(shards) and summary["retries"] == 0
    table = {row.split("|")[1].strip(): row.split("|")[2].strip() for row in run.stdout.splitlines()
             if row.startswith("|")}
    assert table["output"] == out and table["fused tensors"] == "14" and table["validated"].startswith("yes")

    rows = pq.read_table(os.path.join(out, REPORT_NAME)).to_pylist()
    assert sorted(r["name"] for r in rows) == sorted(base_index["weight_map"])
    fused = [r for r in rows if r["fused"]]
    assert len(fused) == 14 and all(r["adapters"] == [models.adapter] and r["delta_norm"] > 0 for r in fused)
    merged, base = load_checkpoint(out), load_checkpoint(models.base)
    for row in fused:
        delta = merged[row["name"]].double() - base[row["name"]].double()
        # The report's ΔW is before rounding: the stored difference is within bf16 rounding of it.
        assert abs(delta.norm().item() - row["delta_norm"]) <= 0.02 * row["delta_norm"] + 1e-3
        assert row["relative_change"] == pytest.approx(row["delta_norm"] / base[row["name"]].double().norm().item(),
                                                       rel=1e-3)
    assert all(r["delta_norm"] is None and r["scales"] == [] for r in rows if not r["fused"])


def test_tasks_spread_over_a_two_node_cluster_with_a_logical_gpu(models, ray_session, tmp_path):
    cluster, gpu_node = ray_session
    out = str(tmp_path / "merged")
    run = cli("merge", "--base", models.base, "--adapter", models.adapter, "--output", out,
                  "--ray-address", cluster.address)
    assert run.returncode == 0, run.stderr
    assert_bit_identical(load_checkpoint(out), models.reference)
    manifest = json.load(open(os.path.join(out, MANIFEST_NAME)))
    nodes = {s["node"] for s in manifest["output"]["shards"]}
    assert nodes == {cluster.head_node.node_id, gpu_node.node_id}, "shards ran on both nodes"
    # the one logical GPU takes two tasks at once (half a GPU each), the CPU-only head one
    assert manifest["cluster"]["lanes"] == {"gpu": 2, f"cpu@{cluster.head_node.node_id[:8]}": 1}


def test_existing_model_is_refused_without_overwrite_and_replaced_with_it(models, ray_session, tmp_path):
    cluster, _ = ray_session
    out = tmp_path / "merged"
    out.mkdir()
    (out / INDEX_NAME).write_text('{"weight_map": {}}')
    (out / "model.safetensors").write_bytes(b"precious")
    before = {n: sha256(str(out / n)) for n in os.listdir(out)}

    run = cli("merge", "--base", models.base, "--adapter", models.adapter, "--output", str(out),
                  "--ray-address", cluster.address)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: {out}/{INDEX_NAME}: the output already holds a model "
        "(pass --overwrite to replace it, or choose another --output)")
    assert {n: sha256(str(out / n)) for n in os.listdir(out)} == before

    run = cli("merge", "--base", models.base, "--adapter", models.adapter, "--output", str(out),
                  "--ray-address", cluster.address, "--overwrite")
    assert run.returncode == 0, run.stderr
    assert not (out / "model.safetensors").exists(), "the old model's weights must not linger beside the new ones"
    assert_bit_identical(load_checkpoint(str(out)), models.reference)


def test_several_adapters_combined_through_the_cli_and_verified(models, ray_session, tmp_path):
    """--combine ties of two adapters on the cluster: the manifest says how, verify re-derives every
    tensor with the same arithmetic, and the result differs from a plain weighted sum."""
    from tests.reference import make_adapter

    cluster, _ = ray_session
    second = make_adapter(str(tmp_path / "second"), "qwen2", seed=7, r=2, lora_alpha=4, target_modules=["q_proj"])
    common = ["--base", models.base, "--adapter", models.adapter, "--adapter", second, "--weight", "0.7",
              "--weight", "0.3", "--ray-address", cluster.address]
    ties = ["--combine", "ties", "--density", "0.5"]
    out, plain = str(tmp_path / "ties"), str(tmp_path / "plain")
    for target, extra in ((out, ties), (plain, [])):
        run = cli("merge", *common, *extra, "--output", target)
        assert run.returncode == 0, run.stderr
    manifest = json.load(open(os.path.join(out, MANIFEST_NAME)))
    assert manifest["arithmetic"] == {"rounding": "once", "combine": {
        "method": "ties", "density": 0.5, "seed": 0, "majority_sign_method": "total"}}
    merged, summed = load_checkpoint(out), load_checkpoint(plain)
    assert any(not merged[k].equal(summed[k]) for k in merged if "q_proj" in k), "TIES prunes and elects signs"

    run = cli("verify", *common, *ties, "--merged", out)
    assert run.returncode == 0, run.stderr
    # Left out, the weights and the arithmetic are the manifest's: the same verdict.
    run = cli("verify", "--base", models.base, "--adapter", models.adapter, "--adapter", second, "--merged", out)
    assert run.returncode == 0, run.stderr
    # Given and different, they are used, and one line says how they differ from the record.
    run = cli("verify", *common, "--combine", "magnitude_prune", "--merged", out)
    assert run.returncode == 4 and "q_proj.weight" in run.stderr
    assert (f"{out}/merge_manifest.json records how the adapters were merged, and the options given differ: "
            "--combine magnitude_prune (recorded: ties); using the options given") in run.stderr.splitlines()


def test_adapters_of_different_bases_are_refused_unless_allowed(models, tmp_path):
    import shutil

    copies = []
    for name, base_name in (("first", "org/base-model"), ("other", "someone/another-model")):
        shutil.copytree(models.adapter, tmp_path / name)
        config = json.load(open(tmp_path / name / "adapter_config.json"))
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": base_name}))
        copies.append(str(tmp_path / name))
    plan = ["plan", "--base", models.base, "--adapter", copies[0], "--adapter", copies[1]]
    run = cli(*plan)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: {copies[1]}: was trained on 'someone/another-model', but {copies[0]} on 'org/base-model' "
        "(merge adapters of one base, or pass --allow-base-mismatch if the bases are the same weights under "
        "other names)")
    assert cli(*plan, "--allow-base-mismatch").returncode == 0


def test_resized_vocabulary_and_untied_head_through_the_cli_and_verified(ray_session, tmp_path):
    """A tied 96-token base; the adapter was made after resize_token_embeddings(100) with a trained
    lm_head (modules_to_save). The merge resizes the embedding, adds an untied 100-row lm_head.weight to
    the embedding's shard, rewrites config.json, validates all of it on the cluster, records it in the
    manifest, and `verify` re-derives it. The result equals PEFT's, bit for bit."""
    from peft import LoraConfig

    from tests.reference import make_base
    from tests.variant_reference import build_adapter, causal_lm, peft_reference, read_config

    cluster, _ = ray_session
    spec = causal_lm(tie_word_embeddings=True)
    base = make_base(str(tmp_path / "base"), tie_word_embeddings=True)
    adapter = build_adapter(spec, base, str(tmp_path / "adapter"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]), resize=100)
    # the tokenizer with the 4 new tokens, saved beside the adapter, replaces the base's whole
    (tmp_path / "base" / "tokenizer_config.json").write_text('{"base": true}')
    (tmp_path / "base" / "tokenizer.model").write_bytes(b"the base's vocabulary")
    (tmp_path / "adapter" / "tokenizer_config.json").write_text('{"added": 4}')
    (tmp_path / "adapter" / "added_tokens.json").write_text('{"<a>": 96, "<b>": 97, "<c>": 98, "<d>": 99}')
    reference = peft_reference(spec, base, [adapter], str(tmp_path / "peft"), resize=100)
    out = str(tmp_path / "merged")
    common = ["--base", base, "--adapter", adapter, "--ray-address", cluster.address]
    planned = cli("plan", "--base", base, "--adapter", adapter)
    assert planned.returncode == 0, planned.stderr
    assert "resizes model.embed_tokens.weight from [96, 64] to [100, 64]" in planned.stdout
    assert "adds lm_head.weight (untied from model.embed_tokens.weight)" in planned.stdout
    assert "rewrites config.json: vocab_size=100, tie_word_embeddings=False" in planned.stdout
    run = cli("merge", *common, "--output", out)
    assert run.returncode == 0, run.stderr
    assert_bit_identical(load_checkpoint(out), reference)
    assert reference["lm_head.weight"].shape == (100, 64)

    config = read_config(out)
    assert (config["vocab_size"], config["tie_word_embeddings"]) == (100, False)
    assert (config["vocab_size"], config["tie_word_embeddings"]) == tuple(
        read_config(str(tmp_path / "peft"))[k] for k in ("vocab_size", "tie_word_embeddings"))
    index = json.load(open(os.path.join(out, INDEX_NAME)))
    base_index = json.load(open(os.path.join(base, INDEX_NAME)))
    embed_shard = base_index["weight_map"]["model.embed_tokens.weight"]
    assert index["weight_map"] == base_index["weight_map"] | {"lm_head.weight": embed_shard}
    new_bytes = (4 + 100) * 64 * 2  # 4 new embedding rows, a new 100-row head
    assert index["metadata"]["total_size"] == base_index["metadata"]["total_size"] + new_bytes
    manifest = json.load(open(os.path.join(out, MANIFEST_NAME)))
    assert manifest["model_changes"] == {
        "config": {"vocab_size": 100, "tie_word_embeddings": False},
        "resized_tensors": {"model.embed_tokens.weight": [[96, 64], [100, 64]]},
        "added_tensors": {"lm_head.weight": "model.embed_tokens.weight"},
        "files_from_adapters": {"added_tokens.json": adapter, "tokenizer_config.json": adapter},
        "base_files_left_out": ["tokenizer.model"],
        "config_removed": [], "requantized_tensors": 0, "dequantized_tensors": 0}
    assert not os.path.exists(os.path.join(out, "tokenizer.model"))
    for name in ("tokenizer_config.json", "added_tokens.json"):  # the adapter's tokenizer, not the base's
        assert open(os.path.join(out, name)).read() == open(os.path.join(adapter, name)).read()
    assert {f["name"]: f["source"] for f in manifest["output"]["files"]}["tokenizer_config.json"] == adapter
    report = pq.read_table(os.path.join(out, REPORT_NAME)).to_pylist()
    assert {r["name"]: r["shape"] for r in report}["lm_head.weight"] == [100, 64]

    run = cli("verify", *common, "--merged", out)
    assert run.returncode == 0, run.stderr
    with open(os.path.join(out, "config.json"), "w") as f:  # a config that ties the head again
        json.dump(config | {"tie_word_embeddings": True}, f)
    run = cli("verify", *common, "--merged", out)
    assert run.returncode == 4
    assert f"{out}/config.json: tie_word_embeddings is True, the merge makes it False" in run.stderr


def test_moe_experts_stored_per_expert_through_the_cli_and_verified(ray_session, tmp_path):
    """LoRA on Mixtral's fused expert parameters (target_parameters), merged into the checkpoint's
    per-expert w1/w3/w2 tensors on the cluster, each from its slice of lora_A and lora_B; validated,
    verified, and equal to PEFT's merge bit for bit."""
    from peft import LoraConfig

    from tests.variant_reference import build_adapter, mixtral, peft_reference, save_base

    cluster, _ = ray_session
    spec = mixtral()
    base = save_base(spec, str(tmp_path / "base"))
    adapter = build_adapter(spec, base, str(tmp_path / "adapter"), LoraConfig(
        r=2, lora_alpha=6, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    reference = peft_reference(spec, base, [adapter], str(tmp_path / "peft"))
    out = str(tmp_path / "merged")
    common = ["--base", base, "--adapter", adapter, "--ray-address", cluster.address]
    run = cli("merge", *common, "--output", out)
    assert run.returncode == 0, run.stderr
    assert_bit_identical(load_checkpoint(out), reference)
    manifest = json.load(open(os.path.join(out, MANIFEST_NAME)))
    assert manifest["fused_tensor_count"] == 2 * 4 * 3  # layers × experts × (w1, w3, w2)
    assert manifest["adapters"][0]["scales"] == {f"model.layers.{i}.mlp.experts.{p}": 3.0 for i in (0, 1)
                                                for p in ("gate_up_proj", "down_proj")}
    run = cli("verify", *common, "--merged", out)
    assert run.returncode == 0, run.stderr
