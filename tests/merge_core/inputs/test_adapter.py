"""Adapter reading: scales and patterns as PEFT computes them, exact key pairing, refusals by name."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_core.errors import InputError
from merge_core.inputs.adapter import load_adapter
from merge_core.inputs.adapter_config import lora_scale, pattern_key
from merge_core.inputs.checkpoint import load_base
from merge_core.io.local import LocalStorage
from merge_core.kinds import ExpertShare
from merge_core.planning.planner import plan_merge
from tests.reference import make_adapter, make_base

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    return make_adapter(str(tmp_path_factory.mktemp("adapter") / "lora"), target_modules=["q_proj", "v_proj"])


@pytest.fixture
def adapter_copy(adapter_dir, tmp_path):
    for name in os.listdir(adapter_dir):
        (tmp_path / name).write_bytes(open(os.path.join(adapter_dir, name), "rb").read())
    return tmp_path


def edit_config(path, **changes) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def edit_tensors(path, edit) -> None:
    tensors = load_file(str(path / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(path / WEIGHTS))


MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.10.mlp.down_proj",
           "model.layers.1.mlp.down_proj", "lm_head", "model.layers.0.self_attn.v_proj"]
PATTERNS = ["q_proj", r"layers\.1\.mlp\.down_proj", "model.layers.0.self_attn.v_proj", "proj", "s.1.self_attn.q_proj",
            r"layers\.(0|1)\.self_attn\.q_proj"]


@pytest.mark.parametrize("module", MODULES)
def test_pattern_matching_agrees_with_peft(module):
    from peft.utils.other import get_pattern_key
    for keys in (PATTERNS, PATTERNS[::-1], PATTERNS[3:]):
        ours = pattern_key(keys, module)
        assert (ours if ours is not None else module) == get_pattern_key(keys, module)


def test_scales_follow_config_and_patterns():
    config = {"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"v_proj": 3}}
    assert lora_scale(config, "model.layers.0.self_attn.q_proj") == (4, 4.0)
    assert lora_scale(config, "model.layers.0.self_attn.v_proj") == (8, 3 / 8)
    assert lora_scale(config | {"use_rslora": True}, "model.layers.0.mlp.up_proj") == (8, 16 / math.sqrt(8))


def test_pairs_map_to_base_tensors(adapter_dir):
    adapter = load_adapter(LocalStorage(adapter_dir))
    assert [u.target for u in adapter.updates] == [f"model.layers.{i}.self_attn.{m}.weight"
                                                   for i in (0, 1) for m in ("q_proj", "v_proj")]
    assert all(u.kind == "lora" and u.rank == 8 and u.scale == 2.0 for u in adapter.updates)


def refused(path) -> str:
    with pytest.raises(InputError) as info:
        load_adapter(LocalStorage(str(path)))
    return str(info.value)


def test_config_not_json(adapter_copy):
    (adapter_copy / "adapter_config.json").write_text("{oops")
    assert "adapter_config.json: not valid JSON" in refused(adapter_copy)


def test_config_missing_fields(adapter_copy):
    config = json.loads((adapter_copy / "adapter_config.json").read_text())
    del config["r"], config["lora_alpha"]
    (adapter_copy / "adapter_config.json").write_text(json.dumps(config))
    assert "lacks required field(s) r, lora_alpha" in refused(adapter_copy)


def test_unknown_peft_type(adapter_copy):
    edit_config(adapter_copy, peft_type="VERA")
    assert "peft_type 'VERA' is not supported (supported: LORA, IA3, LOHA, LOKR;" in refused(adapter_copy)


@pytest.mark.parametrize("switch", ["ensure_weight_tying", "layer_replication", "trainable_token_indices"])
def test_variant_not_merged_yet_is_refused_by_name(adapter_copy, switch):
    edit_config(adapter_copy, **{switch: ["x"]})
    assert f"uses {switch}, which lora-merge does not merge yet" in refused(adapter_copy)


def test_ranks_disagree(adapter_copy):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    edit_tensors(adapter_copy, lambda t: t.update({key: torch.ones(t[key].shape[0], 4)}))
    assert "module model.layers.0.self_attn.q_proj: lora_A rank 8 and lora_B rank 4 disagree" in refused(adapter_copy)


def test_rank_differs_from_config(adapter_copy):
    edit_config(adapter_copy, r=16)
    assert "tensors have rank 8 but the config gives 16" in refused(adapter_copy)


def test_unpaired_tensor(adapter_copy):
    edit_tensors(adapter_copy, lambda t: t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"))
    assert "module model.layers.1.self_attn.v_proj: has no lora_A weight" in refused(adapter_copy)


def test_unknown_tensor_kind(adapter_copy):
    edit_tensors(adapter_copy, lambda t: t.update({"base_model.model.model.norm.weight": torch.ones(64)}))
    assert ("tensor base_model.model.model.norm.weight: is neither an adapter weight nor a module PEFT saves whole"
            in refused(adapter_copy))


def test_half_an_embedding_pair_is_named(adapter_copy):
    key = "base_model.model.model.embed_tokens.lora_embedding_A"
    edit_tensors(adapter_copy, lambda t: t.update({key: torch.ones(8, 96)}))
    assert "module model.embed_tokens: has no lora_embedding_B weight" in refused(adapter_copy)


def test_empty_adapter(adapter_copy):
    save_file({}, str(adapter_copy / WEIGHTS))
    assert "holds no tensors" in refused(adapter_copy)


def test_pickle_only_adapter_is_never_unpickled(adapter_copy):
    os.unlink(adapter_copy / WEIGHTS)
    # A pickle that would run code if anything loaded it.
    (adapter_copy / "adapter_model.bin").write_bytes(b"cos\nsystem\n(S'touch /tmp/pwned-lora-merge'\ntR.")
    assert "stored only as a pickle, which lora-merge does not unpickle unasked" in refused(adapter_copy)
    assert not os.path.exists("/tmp/pwned-lora-merge")


def test_adapter_for_another_model(tmp_path, adapter_dir):
    base = make_base(str(tmp_path / "base"))
    adapter = load_adapter(LocalStorage(adapter_dir))
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for name in os.listdir(adapter_dir):
        (wrong / name).write_bytes(open(os.path.join(adapter_dir, name), "rb").read())
    edit_tensors(wrong, lambda t: t.update({
        "base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight": torch.ones(8, 64),
        "base_model.model.model.layers.5.self_attn.q_proj.lora_B.weight": torch.ones(64, 8)}))
    with pytest.raises(InputError, match="targets model.layers.5.self_attn.q_proj.weight, which the base checkpoint "
                                         "does not have"):
        plan_merge(load_base(LocalStorage(base)), [load_adapter(LocalStorage(str(wrong)))], [1.0])
    assert plan_merge(load_base(LocalStorage(base)), [adapter], [1.0]).fused_tensor_count == 4


def test_delta_shape_that_does_not_fit(tmp_path, adapter_copy):
    base = make_base(str(tmp_path / "base"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    edit_tensors(adapter_copy, lambda t: t.update({key: torch.ones(40, 8)}))
    with pytest.raises(InputError, match=r"delta shape \[40, 64\] does not fit model.layers.0.self_attn.q_proj.weight "
                                         r"of shape \[64, 64\]"):
        plan_merge(load_base(LocalStorage(base)), [load_adapter(LocalStorage(str(adapter_copy)))], [1.0])


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_inits_that_rewrite_the_base_are_refused(adapter_copy, init):
    edit_config(adapter_copy, init_lora_weights=init)
    assert f"init_lora_weights {init!r} rewrites the base weights" in refused(adapter_copy)


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "mica"])
def test_inits_that_leave_the_base_alone_merge_as_plain_lora(adapter_copy, init):
    edit_config(adapter_copy, init_lora_weights=init)
    assert len(load_adapter(LocalStorage(str(adapter_copy))).updates) == 4


def test_invalid_pattern_regex_is_bad_input(adapter_copy):
    edit_config(adapter_copy, rank_pattern={"q_proj(": 8})
    assert "is not a valid regular expression" in refused(adapter_copy)


def test_weights_must_be_finite(tmp_path, adapter_dir):
    base = make_base(str(tmp_path / "base"))
    with pytest.raises(InputError, match="--weight: weights \\[nan\\] are not all finite numbers"):
        plan_merge(load_base(LocalStorage(base)), [load_adapter(LocalStorage(adapter_dir))], [float("nan")])


def test_lora_bias_on_a_layer_without_a_bias_is_refused(tmp_path):
    base = make_base(str(tmp_path / "base"))  # Llama: no bias on q_proj
    adapter = make_adapter(str(tmp_path / "adapter"), target_modules=["q_proj"], lora_bias=True)
    with pytest.raises(InputError, match="targets model.layers.0.self_attn.q_proj.bias, which the base checkpoint "
                                         "does not have"):
        plan_merge(load_base(LocalStorage(base)), [load_adapter(LocalStorage(adapter))], [1.0])


def expert_adapter(path, depths: int, params: list[str], experts: int = 4, rank: int = 2, sizes=(8, 6),
                   layers=(0,)) -> None:
    """A target_parameters adapter on experts modules with `depths` nested wrappers ((in, out) each)."""
    path.mkdir(exist_ok=True)
    tensors = {}
    for depth, layer in ((d, layer) for d in range(depths) for layer in layers):
        name = f"base_model.model.model.layers.{layer}.mlp.experts" + ".base_layer" * depth
        tensors[f"{name}.lora_A.weight"] = torch.randn(rank * experts, sizes[0])
        tensors[f"{name}.lora_B.weight"] = torch.randn(sizes[1], rank * experts)
    save_file(tensors, str(path / WEIGHTS))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 4, "target_modules": None,
        "target_parameters": [f"mlp.experts.{p}" for p in params]}))


def test_parameter_wrappers_are_told_apart_by_nesting_depth(tmp_path):
    """The first-registered parameter (gate_up_proj) is the innermost wrapper, whatever the config's order."""
    expert_adapter(tmp_path, 2, ["down_proj", "gate_up_proj"])
    updates = {u.target: u for u in load_adapter(LocalStorage(str(tmp_path))).updates}
    module = "model.layers.0.mlp.experts"
    assert updates[f"{module}.gate_up_proj"].factors[0].name.endswith("experts.base_layer.lora_A.weight")
    assert updates[f"{module}.down_proj"].factors[0].name.endswith("experts.lora_A.weight")
    assert {u.kind for u in updates.values()} == {"param"} and updates[f"{module}.down_proj"].experts == ExpertShare(4)


@pytest.mark.parametrize("depths, params, message", [
    (1, ["gate_up_proj", "down_proj"], "has LoRA weights at 1 nesting depth"),
    (2, ["w_out", "w_in"], r"has LoRA on several parameters \[.w_in., .w_out.\] whose nesting order"),
])
def test_parameter_wrappers_that_cannot_be_placed_are_refused(tmp_path, depths, params, message):
    expert_adapter(tmp_path, depths, params)
    with pytest.raises(InputError, match=f"module model.layers.0.mlp.experts: {message}"):
        load_adapter(LocalStorage(str(tmp_path)))


def test_expert_parameters_the_base_does_not_store_are_refused(tmp_path):
    expert_adapter(tmp_path / "adapter", 1, ["down_proj"])
    base = load_base(LocalStorage(make_base(str(tmp_path / "base"))))
    with pytest.raises(InputError, match=r"targets model.layers.0.mlp.experts.down_proj, which the base checkpoint "
                                         r"does not have \(neither whole nor one tensor per expert\)"):
        plan_merge(base, [load_adapter(LocalStorage(str(tmp_path / "adapter")))], [1.0])


def test_adapter_for_fewer_experts_than_the_base_stores_is_refused(tmp_path):
    """Merging 2 experts' LoRA into a 4-expert base would leave half the experts untouched: refused."""
    from tests.variant_reference import mixtral, save_base

    base = load_base(LocalStorage(save_base(mixtral(), str(tmp_path / "base"))))
    expert_adapter(tmp_path / "adapter", 1, ["down_proj"], experts=2, sizes=(32, 64), layers=(0, 1))
    with pytest.raises(InputError, match=r"lora_A.weight: holds LoRA for 2 experts of model.layers.0.mlp.experts."
                                         r"down_proj, but the base stores 4"):
        plan_merge(base, [load_adapter(LocalStorage(str(tmp_path / "adapter")))], [1.0])
