"""The report's view: tensor names placed as (layer, module), grids of ‖ΔW‖/‖W‖ and of what
requantization kept, and the summary, from hand-written reports and from a real merge's."""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file, save_file

from merge_core.errors import InputError
from merge_core.names import CONFIG_JSON, INDEX_NAME, MANIFEST_NAME, REPORT_NAME
from merge_core.publish.report_summary import summary_text
from merge_core.publish.report_view import load_view, place
from tests.local_merge import merge_without_ray
from tests.reference import make_adapter, make_base

LORA_MERGE = os.path.join(os.path.dirname(sys.executable), "lora-merge")
BOOSTED_LAYER = 2  # its lora_B times 50: the layer the summary must name first


@pytest.mark.parametrize("name, layer, module, unit", [
    # GPT-2: fused qkv, Conv1D c_proj meaning o under attn and down under mlp, no "model." prefix on the hub
    ("transformer.h.0.attn.c_attn.weight", 0, "qkv", "attn.c_attn"),
    ("transformer.h.0.attn.c_attn.bias", 0, "qkv", "attn.c_attn"),  # a bias folds into its module
    ("transformer.h.11.attn.c_proj.weight", 11, "o", "attn.c_proj"),
    ("transformer.h.3.mlp.c_proj.weight", 3, "down", "mlp.c_proj"),
    ("h.3.mlp.c_fc.weight", 3, "up", "mlp.c_fc"),
    ("transformer.h.3.ln_1.weight", 3, "other", "ln_1"),
    ("transformer.wte.weight", None, "embeddings", "transformer.wte"),
    ("transformer.wpe.weight", None, "embeddings", "transformer.wpe"),
    ("transformer.ln_f.weight", None, "other", "transformer.ln_f"),
    # Llama
    ("model.layers.7.self_attn.q_proj.weight", 7, "q", "self_attn.q_proj"),
    ("model.layers.7.self_attn.k_proj.weight", 7, "k", "self_attn.k_proj"),
    ("model.layers.7.self_attn.v_proj.bias", 7, "v", "self_attn.v_proj"),
    ("model.layers.7.self_attn.o_proj.weight", 7, "o", "self_attn.o_proj"),
    ("model.layers.7.mlp.gate_proj.weight", 7, "gate", "mlp.gate_proj"),
    ("model.layers.7.mlp.up_proj.weight", 7, "up", "mlp.up_proj"),
    ("model.layers.7.mlp.down_proj.weight", 7, "down", "mlp.down_proj"),
    ("model.layers.7.input_layernorm.weight", 7, "other", "input_layernorm"),
    ("model.embed_tokens.weight", None, "embeddings", "model.embed_tokens"),
    ("lm_head.weight", None, "head", "lm_head"),
    ("model.norm.weight", None, "other", "model.norm"),
    ("gpt_neox.embed_in.weight", None, "embeddings", "gpt_neox.embed_in"),
    ("embed_out.weight", None, "head", "embed_out"),  # GPT-NeoX's head, despite "embed"
    # Qwen3-MoE and Mixtral: one tensor per expert, one unit per expert; the router apart
    ("model.layers.5.mlp.experts.17.gate_proj.weight", 5, "experts", "17"),
    ("model.layers.5.mlp.experts.17.down_proj.weight", 5, "experts", "17"),
    ("model.layers.5.mlp.gate.weight", 5, "router", "mlp.gate"),
    ("model.layers.5.mlp.shared_expert.up_proj.weight", 5, "shared", "shared"),
    ("model.layers.1.block_sparse_moe.experts.3.w1.weight", 1, "experts", "3"),
    ("model.layers.1.self_attn.q_norm.weight", 1, "other", "self_attn.q_norm"),
    # GPT-OSS: experts fused in 3-D tensors (and MXFP4 blocks): one unit for all of them
    ("model.layers.2.mlp.experts.gate_up_proj", 2, "experts", "all"),
    ("model.layers.2.mlp.experts.gate_up_proj_bias", 2, "experts", "all"),
    ("model.layers.2.mlp.experts.down_proj_blocks", 2, "experts", "all"),
    ("model.layers.2.mlp.router.weight", 2, "router", "mlp.router"),
    ("model.layers.2.self_attn.sinks", 2, "other", "self_attn"),
    # a multimodal model's language stack
    ("model.language_model.layers.4.self_attn.q_proj.weight", 4, "q", "self_attn.q_proj"),
])
def test_names_are_placed_as_layer_and_module(name, layer, module, unit):
    where = place(name)
    assert (where.layer, where.module, where.unit) == (layer, module, unit)


def test_stacks_of_layers_are_kept_apart():
    assert place("model.language_model.layers.4.mlp.up_proj.weight").stack == "model.language_model"
    assert place("model.vision_tower.encoder.layers.4.self_attn.q_proj.weight").stack == "model.vision_tower.encoder"
    assert place("backbone.layers.0.mixer.in_proj.weight").stack == "backbone"


def report_bytes(rows: list[dict], quantized: bool = False, split: bool = False) -> bytes:
    """A report as merge_core.publish.report writes it, with the optional columns asked for."""
    fields = [("name", pa.string()), ("shard", pa.string()), ("dtype", pa.string()), ("shape", pa.list_(pa.int64())),
              ("fused", pa.bool_()), ("adapters", pa.list_(pa.string())), ("scales", pa.list_(pa.float64())),
              ("delta_norm", pa.float64()), ("delta_max_abs", pa.float64()), ("relative_change", pa.float64())]
    fields += [("adapter_delta_norms", pa.list_(pa.float64()))] * split
    fields += [("requant_error", pa.float64()), ("adapter_kept", pa.float64())] * quantized
    schema = pa.schema(fields)
    defaults = {"shard": "model.safetensors", "dtype": "BF16", "shape": [4, 4], "fused": False, "adapters": [],
                "scales": []}
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([defaults | r for r in rows], schema=schema), buffer)
    return buffer.getvalue()


def fused(name: str, adapters: list[str], norms: list[float], relative: float, **more) -> dict:
    delta = math.sqrt(sum(n * n for n in norms)) if all(math.isfinite(n) for n in norms) else math.nan
    return {"name": name, "fused": True, "adapters": adapters, "scales": [2.0] * len(adapters), "delta_norm": delta,
            "delta_max_abs": delta / 10, "relative_change": relative, "adapter_delta_norms": norms} | more


A, B = "s3://loras/a", "/data/loras/b/"
TWO_ADAPTERS_QUANTIZED = [
    fused("model.layers.0.self_attn.q_proj.weight", [A, B], [3.0, 4.0], 0.5, adapter_kept=0.9, requant_error=0.1),
    fused("model.layers.0.self_attn.k_proj.weight", [A], [2.0], 0.1, adapter_kept=0.2, requant_error=1.5),
    fused("model.layers.0.self_attn.v_proj.weight", [A], [2.0], 0.1, adapter_kept=0.45, requant_error=0.9),
    {"name": "model.layers.0.self_attn.k_proj.weight_scale_inv", "dtype": "F32"},
    {"name": "model.layers.0.mlp.gate.weight"},
    fused("model.layers.0.mlp.experts.0.gate_proj.weight", [A], [1.0], 0.01, adapter_kept=1.0),
    fused("model.layers.0.mlp.experts.0.up_proj.weight", [A], [1.0], 0.01, adapter_kept=1.0),
    fused("model.layers.0.mlp.experts.1.gate_proj.weight", [A], [3.0], 0.03, adapter_kept=0.8),
    {"name": "model.layers.0.mlp.experts.1.up_proj.weight"},
    {"name": "model.layers.1.self_attn.q_proj.weight"},
    fused("model.layers.1.self_attn.v_proj.weight", [B], [math.nan], math.nan, adapter_kept=0.9),
    {"name": "model.embed_tokens.weight"},
]
MANIFEST = {"created": "2026-11-29T23:25:21+00:00", "base": {"uri": "s3://models/Qwen3-30B-A3B-FP8/"},
            "arithmetic": {"rounding": "once", "combine": None},
            "adapters": [{"uri": A, "weight": 0.7, "peft_type": "LORA", "config": {"r": 16, "rank_pattern": {}}},
                         {"uri": B, "weight": 0.3, "peft_type": "LORA", "config": {"r": 8, "rank_pattern": {"x": 4}}}]}


def test_several_adapters_get_a_grid_each_and_a_quantized_base_a_grid_of_what_was_kept():
    view = load_view(report_bytes(TWO_ADAPTERS_QUANTIZED, quantized=True, split=True), MANIFEST)
    a, b = view.grids
    assert a.layers == b.layers == ("embed", "0", "1")
    assert a.modules == ("q", "k", "v", "router", "experts", "embeddings")
    # ‖W‖ of q_proj is 5 / 0.5 = 10: each adapter's own norm over it
    assert a.cell("0", "q") == pytest.approx(0.3) and b.cell("0", "q") == pytest.approx(0.4)
    assert a.cell("0", "k") == pytest.approx(0.1)
    assert b.cell("0", "k") == 0 and b.states[1][1] == "unchanged"  # b never touched k_proj
    # experts: expert 0 is 0.01 (gate and up together), expert 1 is 0.03 (its untouched up_proj has no known ‖W‖)
    assert a.cell("0", "experts") == pytest.approx(0.02) and a.extreme[1][4] == pytest.approx(0.03)
    assert math.isnan(a.cell("1", "experts")) and a.states[2][4] == "absent"
    assert a.cell("0", "router") == 0 and a.states[1][3] == "unchanged"
    assert b.states[2][2] == "nonfinite" and math.isinf(b.cell("1", "v"))
    assert a.states[2][2] == "unchanged"  # the NaN is b's, not a's
    assert a.title.endswith(" of a") and b.title.endswith(" of b")  # the URIs' last parts

    kept = view.kept
    assert kept.cell("0", "k") == pytest.approx(0.2) and kept.cell("0", "q") == pytest.approx(0.9)
    # dn-weighted: expert 0 kept 1.0, expert 1 kept 0.8; the least kept is the cell's extreme
    assert kept.cell("0", "experts") == pytest.approx(0.9) and kept.extreme[1][4] == pytest.approx(0.8)
    assert kept.states[0][5] == "unchanged"


def test_the_summary_names_adapters_what_was_lost_and_what_is_not_finite():
    view = load_view(report_bytes(TWO_ADAPTERS_QUANTIZED, quantized=True, split=True), MANIFEST)
    summary = summary_text(view)
    assert view.model == "Qwen3-30B-A3B-FP8" and view.created == "2026-11-29"
    assert "s3://loras/a: LORA, rank 16, weight 0.7; touched q, k, v, experts (6 tensors, layer 0)" in summary
    assert "rank 8 (varies by module), weight 0.3; touched q, v (2 tensors, layers 0-1)" in summary
    assert "left unchanged" not in summary  # layer 1's only fused tensor is NaN: changed, not unchanged
    lost = next(line for line in summary.splitlines() if line.startswith("requantization"))
    assert "lost (kept < 0.5) in 2 of 7 tensors" in lost
    assert lost.index("k_proj.weight (0.20, requant error 1.5)") < lost.index("v_proj.weight (0.45")
    assert "q_proj" not in lost
    assert "non-finite: 1 tensor: model.layers.1.self_attn.v_proj.weight" in summary


def test_a_report_without_the_optional_columns_gives_one_grid_and_no_kept_grid():
    rows = [{k: v for k, v in r.items() if k not in ("adapter_delta_norms", "adapter_kept", "requant_error")}
            for r in TWO_ADAPTERS_QUANTIZED]
    view = load_view(report_bytes(rows), MANIFEST)
    assert len(view.grids) == 1 and view.kept is None
    assert view.grids[0].cell("0", "q") == pytest.approx(0.5)
    assert "requantization" not in summary_text(view)


def test_a_report_that_is_not_parquet_is_bad_input():
    with pytest.raises(InputError, match=REPORT_NAME):
        load_view(b"not parquet", MANIFEST)


@dataclass(frozen=True)
class Merged:
    base: str
    output: str

    def read(self, name: str) -> bytes:
        return open(os.path.join(self.output, name), "rb").read()

    def view(self):
        return load_view(self.read(REPORT_NAME), json.loads(self.read(MANIFEST_NAME)),
                         json.loads(self.read(CONFIG_JSON)))


@functools.cache
def real_merge(root: str) -> Merged:
    """A 4-layer Llama and an adapter on every projection but k_proj, layer 2's update 50 times the
    others', merged by the worker and final task's own code (tests/local_merge.py), once per session."""
    base, adapter, output = (os.path.join(root, n) for n in ("base", "adapter", "merged"))
    make_base(base, num_hidden_layers=4)
    make_adapter(adapter, sizes={"num_hidden_layers": 4},
                 target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    weights = os.path.join(adapter, "adapter_model.safetensors")
    tensors = {k: v * 50 if f".layers.{BOOSTED_LAYER}." in k and "lora_B" in k else v
               for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    merge_without_ray(base, [adapter], output)
    return Merged(base, output)


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Merged:
    return real_merge(str(tmp_path_factory.getbasetemp() / "report-view-merge"))


def test_a_real_merge_grid_holds_every_layer_and_module_and_shows_untouched_k_proj_unchanged(merged):
    view = merged.view()
    grid = view.grids[0]
    assert len(view.grids) == 1 and view.kept is None
    assert grid.layers == ("embed", "0", "1", "2", "3", "final")
    assert grid.modules == ("q", "k", "v", "o", "gate", "up", "down", "embeddings", "head", "other")
    with open(os.path.join(merged.base, INDEX_NAME)) as f:
        weight_map = json.load(f)["weight_map"]
    assert {t.name for t in view.tensors} == set(weight_map)
    for t in view.tensors:  # every tensor of the model is drawn somewhere
        assert grid.states[grid.layers.index(t.row)][grid.modules.index(t.place.module)] != "absent", t.name
    k = grid.modules.index("k")
    for layer in ("0", "1", "2", "3"):
        row = grid.layers.index(layer)
        assert grid.values[row][k] == 0 and grid.states[row][k] == "unchanged"
        assert grid.states[row][grid.modules.index("q")] == "changed"
    q_proj = next(t for t in view.tensors if t.name == f"model.layers.{BOOSTED_LAYER}.self_attn.q_proj.weight")
    assert grid.cell(str(BOOSTED_LAYER), "q") == pytest.approx(q_proj.relative_change, rel=1e-12)
    assert grid.cell(str(BOOSTED_LAYER), "q") > 10 * grid.cell("0", "q")
    assert math.isnan(grid.cell("0", "embeddings")) and grid.cell("embed", "embeddings") == 0


def test_a_real_merge_summary_names_the_layer_changed_most(merged):
    summary = summary_text(merged.view())
    assert re.search(r"changed most[^:]*: layer (\w+):", summary).group(1) == str(BOOSTED_LAYER)
    assert re.search(r"changed least: layer (\w+):", summary).group(1) != str(BOOSTED_LAYER)
    assert "LORA, rank 8, weight 1; touched q, v, o, gate, up, down (24 tensors, layers 0-3)" in summary
    assert "non-finite: none" in summary
