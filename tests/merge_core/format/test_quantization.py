"""Quantization schemes from config.json and the grouping of stored tensors into logical weights: real
configs parse, realistic header sets group, and every bad input is refused naming the key or tensor."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest

from merge_core.errors import InputError
from merge_core.format.codecs import describe, group_weights, read_scheme
from merge_core.format.codecs.ct_packed import check_packed_shape
from merge_core.format.codecs.fp8_block import fitting_block
from merge_core.format.header import DTYPE_BYTES, TensorInfo
from merge_core.format.quantization import QuantScheme

WHERE = "base/config.json"
DEEPSEEK_V3 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
MINIMAX_M2 = {"activation_scheme": "dynamic", "fmt": "float8_e4m3fn", "quant_method": "fp8",
              "weight_block_size": [128, 128], "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]}
GPT_OSS = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                      "lm_head"], "quant_method": "mxfp4"}
KIMI_K2_THINKING = {
    "config_groups": {"group_0": {"input_activations": None, "output_activations": None, "targets": ["Linear"],
                                  "weights": {"actorder": None, "block_structure": None, "dynamic": False,
                                              "group_size": 32, "num_bits": 4, "observer": "minmax",
                                              "observer_kwargs": {}, "strategy": "group", "symmetric": True,
                                              "type": "int"}}},
    "format": "pack-quantized", "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                                           "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed"}


def refused(config: dict, *fragments: str) -> str:
    with pytest.raises(InputError) as info:
        read_scheme(config, WHERE)
    message = str(info.value)
    assert message.startswith(WHERE), message
    for fragment in fragments:
        assert fragment in message, message
    return message


def infos(*entries: tuple[str, str, tuple[int, ...]]) -> dict[str, TensorInfo]:
    """TensorInfos laid out one after another, as a parsed header gives them."""
    out, position = {}, 0
    for name, dtype, shape in entries:
        size = DTYPE_BYTES[dtype]
        for d in shape:
            size *= d
        out[name] = TensorInfo(name=name, dtype=dtype, shape=tuple(shape), start=position, end=position + size)
        position += size
    return out


def rejected(scheme: QuantScheme, tensors: dict[str, TensorInfo], *fragments: str) -> str:
    with pytest.raises(InputError) as info:
        group_weights(scheme, tensors, "base")
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---------------------------------------------------------------- read_scheme


def test_real_configs_parse():
    assert read_scheme({"model_type": "llama"}, WHERE) is None
    assert read_scheme({"quantization_config": DEEPSEEK_V3}, WHERE) == QuantScheme("fp8", block=(128, 128))
    v31 = read_scheme({"quantization_config": DEEPSEEK_V3 | {"scale_fmt": "ue8m0"}}, WHERE)
    assert v31.scale_fmt == "ue8m0"
    minimax = read_scheme({"quantization_config": MINIMAX_M2}, WHERE)
    assert minimax.not_converted == ("gate", "e_score_correction_bias", "lm_head")
    alias = {k: v for k, v in MINIMAX_M2.items() if k != "modules_to_not_convert"} | {"ignored_layers": ["lm_head"]}
    assert read_scheme({"quantization_config": alias}, WHERE).not_converted == ("lm_head",)
    assert read_scheme({"quantization_config": GPT_OSS}, WHERE) == QuantScheme(
        "mxfp4", group_size=32, not_converted=tuple(GPT_OSS["modules_to_not_convert"]))
    kimi = read_scheme({"quantization_config": KIMI_K2_THINKING}, WHERE)
    group = kimi.groups[0]
    assert (kimi.method, group.format, group.args.group_size, kimi.not_converted[0]) == (
        "compressed-tensors", "pack-quantized", 32, "lm_head")
    assert (group.args.num_bits, group.args.strategy, group.args.symmetric, kimi.uncoded) == (4, "group", True, ())
    nested = read_scheme({"text_config": {"quantization_config": KIMI_K2_THINKING}}, WHERE)  # Kimi K2.5
    assert nested == kimi
    assert describe(kimi) == "compressed-tensors pack-quantized (int4, group 32)"


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "hqq", None])
def test_other_methods_read_as_formats_without_a_codec(method):
    """Not refused: their tensors are copied, and only an adapter on one of their weights is refused."""
    scheme = read_scheme({"quantization_config": {"quant_method": method, "bits": 4}}, WHERE)
    assert (scheme.method, scheme.uncoded) == (str(method), (str(method),))
    assert group_weights(scheme, infos(("m.qweight", "I32", (8, 8))), "base") == {}
    assert "no codec" in describe(scheme)


def test_nested_config_is_named_in_the_error():
    refused({"text_config": {"quantization_config": KIMI_K2_THINKING | {"config_groups": {}}}},
            "text_config.quantization_config.config_groups")


@pytest.mark.parametrize("change, fragments", [
    ({"fmt": "e5m2"}, ["quantization_config.fmt", "'e5m2'", "e4m3"]),
    ({"scale_fmt": "e4m3"}, ["quantization_config.scale_fmt", "ue8m0"]),
    ({"weight_block_size": None}, ["weight_block_size", "per-tensor"]),
    ({"weight_block_size": [128]}, ["weight_block_size", "two positive integers"]),
    ({"weight_block_size": [128, 0]}, ["weight_block_size"]),
    ({"weight_block_size": "128x128"}, ["weight_block_size"]),
    ({"modules_to_not_convert": "lm_head"}, ["modules_to_not_convert", "list of module names"]),
])
def test_bad_fp8_configs(change, fragments):
    refused({"quantization_config": {k: v for k, v in (DEEPSEEK_V3 | change).items() if v is not None}}, *fragments)


def kimi_with(**weights) -> dict:
    config = copy.deepcopy(KIMI_K2_THINKING)
    config["config_groups"]["group_0"]["weights"].update(weights)
    return config


@pytest.mark.parametrize("config, fragments", [
    (kimi_with(num_bits=9), ["group_0.weights.num_bits", "9", "1 to 8 bits"]),
    (kimi_with(type="float"), ["weights.type", "'float'", "integers"]),
    (kimi_with(strategy="block", block_structure=[128, 128]), ["weights.strategy", "'block'"]),
    (kimi_with(strategy="token"), ["weights.strategy", "'token'", "no stored scales"]),
    (kimi_with(dynamic=True), ["weights.dynamic", "no stored scales"]),
    (kimi_with(group_size=None, strategy="group"), ["weights.group_size", "positive group size"]),
    (kimi_with(strategy="tile"), ["weights.strategy", "'tile'"]),
    (kimi_with(symmetric="yes"), ["weights.symmetric"]),
    (KIMI_K2_THINKING | {"format": "nvfp4-pack-quantized"}, ["group_0.weights", "nvfp4-pack-quantized weights"]),
    (KIMI_K2_THINKING | {"format": "mixed-precision"}, ["group_0.format", "'mixed-precision'"]),
    (KIMI_K2_THINKING | {"quantization_status": "frozen"}, ["quantization_status", "'frozen'"]),
    (KIMI_K2_THINKING | {"sparsity_config": {"format": "sparse-24-bitmask"}}, ["sparsity_config"]),
    (KIMI_K2_THINKING | {"transform_config": {"config_groups": {"u": {}}}}, ["transform_config", "rotated"]),
    (KIMI_K2_THINKING | {"config_groups": {}}, ["config_groups", "missing or empty"]),
    (KIMI_K2_THINKING | {"config_groups": {"group_0": {"weights": None}}}, ["no group quantizes weights"]),
    (KIMI_K2_THINKING | {"config_groups": {"group_0": {"weights": {}, "targets": "Linear"}}}, ["targets"]),
])
def test_bad_compressed_tensors_configs(config, fragments):
    refused({"quantization_config": config}, *fragments)


def test_what_compressed_tensors_writes_parses():
    """The strategies, widths and formats of compressed-tensors 0.20's presets, and mixed precision."""
    assert read_scheme({"quantization_config": kimi_with(num_bits=8)}, WHERE).groups[0].args.num_bits == 8
    asym = read_scheme({"quantization_config": kimi_with(symmetric=False, strategy="channel", group_size=None)},
                       WHERE).groups[0].args
    assert (asym.symmetric, asym.strategy, asym.group_size) == (False, "channel", None)
    mixed = copy.deepcopy(KIMI_K2_THINKING) | {"format": "mixed-precision"}
    mixed["config_groups"]["group_0"]["format"] = "pack-quantized"
    mixed["config_groups"]["group_1"] = {"format": "nvfp4-pack-quantized", "targets": ["re:.*mlp.*"], "weights": {
        "num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True,
        "scale_dtype": "torch.float8_e4m3fn", "dynamic": False}}
    scheme = read_scheme({"quantization_config": mixed}, WHERE)
    assert [(g.key, g.format, g.args.scale_dtype) for g in scheme.groups] == [
        ("group_0", "pack-quantized", None), ("group_1", "nvfp4-pack-quantized", "float8_e4m3fn")]
    assert "mixed-precision" in describe(scheme)
    mxfp6 = copy.deepcopy(mixed)
    mxfp6["config_groups"]["group_1"]["format"] = "mxfp6-pack-quantized"
    assert read_scheme({"quantization_config": mxfp6}, WHERE).uncoded == ("mxfp6-pack-quantized",)
    refused({"quantization_config": ["fp8"]}, "is not a JSON object")


# ---------------------------------------------------------------- FP8 grouping

FP8 = QuantScheme("fp8", block=(128, 128))


def deepseek_layer(scale_dtype: str = "F32") -> dict[str, TensorInfo]:
    """DeepSeek-V3 layer 0's attention and MLP, as its shards store them (kv_a_proj_with_mqa's 576 rows
    make a partial block)."""
    p = "model.layers.0."
    entries = [(p + "input_layernorm.weight", "BF16", (7168,)), (p + "self_attn.kv_a_layernorm.weight", "BF16", (512,))]
    for module, shape in [("self_attn.q_a_proj", (1536, 7168)), ("self_attn.kv_a_proj_with_mqa", (576, 7168)),
                          ("self_attn.o_proj", (7168, 16384)), ("mlp.down_proj", (7168, 18432))]:
        entries.append((p + module + ".weight", "F8_E4M3", shape))
        entries.append((p + module + ".weight_scale_inv", scale_dtype, (-(-shape[0] // 128), -(-shape[1] // 128))))
    return infos(*entries)


def test_fp8_groups_a_deepseek_layer():
    weights = group_weights(FP8, deepseek_layer(), "base")
    assert sorted(weights) == [f"model.layers.0.{m}.weight" for m in ("mlp.down_proj", "self_attn.kv_a_proj_with_mqa",
                                                                      "self_attn.o_proj", "self_attn.q_a_proj")]
    kv = weights["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    assert (kv.codec, kv.shape, kv.dtype, kv.block) == ("fp8_block", (576, 7168), "BF16", (128, 128))
    assert kv.part("scale").shape == (5, 56)
    assert kv.stored_names == (kv.name, kv.name + "_scale_inv")
    assert [role for role, _ in kv.parts] == ["codes", "scale"]
    with pytest.raises(KeyError):
        kv.part("blocks")
    assert group_weights(FP8, deepseek_layer("BF16"), "base")[kv.name].part("scale").dtype == "BF16"


def test_fp8_weight_without_scale():
    tensors = deepseek_layer()
    del tensors["model.layers.0.mlp.down_proj.weight_scale_inv"]
    rejected(FP8, tensors, "base: tensor model.layers.0.mlp.down_proj.weight", "F8_E4M3",
             "no model.layers.0.mlp.down_proj.weight_scale_inv")


def test_fp8_scale_without_weight():
    tensors = deepseek_layer()
    del tensors["model.layers.0.mlp.down_proj.weight"]
    rejected(FP8, tensors, "tensor model.layers.0.mlp.down_proj.weight_scale_inv", "no F8_E4M3 weight")
    fp4 = infos(("model.layers.1.mlp.experts.0.w1.weight", "I8", (2048, 3584)),  # DeepSeek-V4's FP4 experts
                ("model.layers.1.mlp.experts.0.w1.weight_scale_inv", "F8_E8M0", (2048, 224)))
    rejected(FP8, fp4, "w1.weight_scale_inv", "(model.layers.1.mlp.experts.0.w1.weight is I8)")


@pytest.mark.parametrize("dtype", ["F16", "F8_E8M0", "F64"])
def test_fp8_scale_dtype(dtype):
    rejected(FP8, infos(("x.weight", "F8_E4M3", (256, 256)), ("x.weight_scale_inv", dtype, (2, 2))),
             "tensor x.weight_scale_inv", dtype, "F32, BF16")


def test_fp8_block_size_other_than_stored():
    tensors = infos(("x.weight", "F8_E4M3", (576, 7168)), ("x.weight_scale_inv", "F32", (9, 112)))
    message = rejected(FP8, tensors, "tensor x.weight_scale_inv", "shape [9, 112]", "weight_block_size [128, 128]",
                       "make [5, 56]", "made with weight_block_size [64, 64]")
    assert "corrupt" not in message
    odd = infos(("x.weight", "F8_E4M3", (10, 10)), ("x.weight_scale_inv", "F32", (6, 6)))
    assert "corrupt" in rejected(FP8, odd, "make [1, 1]")
    assert "corrupt" in rejected(FP8, infos(("x.weight", "F8_E4M3", (256, 256)), ("x.weight_scale_inv", "F32", (4,))))


def test_fp8_three_dimensional_weight():
    tensors = infos(("experts.weight", "F8_E4M3", (4, 256, 256)), ("experts.weight_scale_inv", "F32", (4, 2, 2)))
    rejected(FP8, tensors, "tensor experts.weight", "only 2-D")


def test_fitting_block():
    assert fitting_block(576, 7168, (5, 56)) == (128, 128)
    assert fitting_block(200, 300, (4, 5)) == (64, 64)
    assert fitting_block(96, 7168, (1, 56)) == (128, 128)  # one block of rows: any size from 96 up
    assert fitting_block(100, 7168, (50, 56)) == (2, 128)  # no common size: one per dimension
    assert fitting_block(10, 10, (6, 6)) is None  # no block size makes 6 blocks of 10


# ---------------------------------------------------------------- MXFP4 grouping

MXFP4 = QuantScheme("mxfp4", group_size=32)


def gpt_oss_20b_layer() -> dict[str, TensorInfo]:
    p = "model.layers.0.mlp."
    return infos((p + "experts.gate_up_proj_blocks", "U8", (32, 5760, 90, 16)),
                 (p + "experts.gate_up_proj_scales", "U8", (32, 5760, 90)),
                 (p + "experts.gate_up_proj_bias", "BF16", (32, 5760)),
                 (p + "experts.down_proj_blocks", "U8", (32, 2880, 90, 16)),
                 (p + "experts.down_proj_scales", "U8", (32, 2880, 90)),
                 (p + "experts.down_proj_bias", "BF16", (32, 2880)),
                 (p + "router.weight", "BF16", (32, 2880)))


def test_mxfp4_groups_gpt_oss_experts_in_the_bf16_models_layout():
    weights = group_weights(MXFP4, gpt_oss_20b_layer(), "base")
    assert sorted(weights) == ["model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.experts.gate_up_proj"]
    gate_up, down = weights["model.layers.0.mlp.experts.gate_up_proj"], weights["model.layers.0.mlp.experts.down_proj"]
    assert gate_up.shape == (32, 2880, 5760)  # (E, H, 2I), transposed as transformers dequantizes it
    assert down.shape == (32, 2880, 2880)  # (E, I, H)
    assert (gate_up.codec, gate_up.group_size, [r for r, _ in gate_up.parts]) == ("mxfp4", 32, ["blocks", "scales"])


@pytest.mark.parametrize("drop, fragments", [
    ("model.layers.0.mlp.experts.down_proj_scales", ["tensor model.layers.0.mlp.experts.down_proj_blocks",
                                                     "no model.layers.0.mlp.experts.down_proj_scales"]),
    ("model.layers.0.mlp.experts.gate_up_proj_blocks", ["tensor model.layers.0.mlp.experts.gate_up_proj_scales",
                                                        "no model.layers.0.mlp.experts.gate_up_proj_blocks"]),
])
def test_mxfp4_unpaired(drop, fragments):
    tensors = gpt_oss_20b_layer()
    del tensors[drop]
    rejected(MXFP4, tensors, *fragments)


def test_mxfp4_misshapen_parts():
    rejected(MXFP4, infos(("e.w_blocks", "U8", (2, 8, 2, 32)), ("e.w_scales", "U8", (2, 8, 2))),
             "tensor e.w_blocks", "U8[2, 8, 2, 32]")
    rejected(MXFP4, infos(("e.w_blocks", "I8", (2, 8, 2, 16)), ("e.w_scales", "U8", (2, 8, 2))), "tensor e.w_blocks")
    rejected(MXFP4, infos(("e.w_blocks", "U8", (2, 8, 2, 16)), ("e.w_scales", "U8", (2, 8, 4))),
             "tensor e.w_scales", "U8[2, 8, 4]", "needs U8 [2, 8, 2]")
    rejected(MXFP4, infos(("e.w_blocks", "U8", (2, 8, 2, 16)), ("e.w_scales", "F8_E8M0", (2, 8, 2))),
             "tensor e.w_scales", "F8_E8M0")


# ---------------------------------------------------------------- INT4 pack-quantized grouping

INT4 = read_scheme({"quantization_config": KIMI_K2_THINKING}, WHERE)


def kimi_expert(module: str = "model.layers.1.mlp.experts.0.gate_proj", rows: int = 2048, cols: int = 7168,
                scale_cols: int | None = None, shape_dtype: str = "I32") -> list:
    return [(module + ".weight_packed", "I32", (rows, cols // 8)),
            (module + ".weight_scale", "BF16", (rows, scale_cols or cols // 32)),
            (module + ".weight_shape", shape_dtype, (2,))]


def test_int4_groups_kimi_experts():
    tensors = infos(*kimi_expert(), *kimi_expert("model.layers.1.mlp.experts.0.down_proj", 7168, 2048, None, "I64"),
                    ("model.layers.1.mlp.shared_experts.down_proj.weight", "BF16", (7168, 2048)))
    weights = group_weights(INT4, tensors, "base")
    assert sorted(weights) == ["model.layers.1.mlp.experts.0.down_proj.weight",
                               "model.layers.1.mlp.experts.0.gate_proj.weight"]
    gate = weights["model.layers.1.mlp.experts.0.gate_proj.weight"]
    assert (gate.codec, gate.shape, gate.args.group_size, gate.dtype) == ("ct_packed", (2048, 7168), 32, "BF16")
    assert gate.roles == ("codes", "scale", "shape")
    assert gate.stored_names == tuple(name for name, _, _ in kimi_expert())
    assert weights["model.layers.1.mlp.experts.0.down_proj.weight"].shape == (7168, 2048)


@pytest.mark.parametrize("role", [".weight_scale", ".weight_shape", ".weight_packed"])
def test_int4_incomplete_triples(role):
    tensors = infos(*kimi_expert())
    del tensors["model.layers.1.mlp.experts.0.gate_proj" + role]
    rejected(INT4, tensors, "base", "model.layers.1.mlp.experts.0.gate_proj")


def test_int4_misshapen_parts():
    rejected(INT4, infos(*kimi_expert(scale_cols=56)), "tensor model.layers.1.mlp.experts.0.gate_proj.weight_packed",
             "896 words a row", "1792 columns", "group_size 32")
    entries = kimi_expert()
    entries[0] = (entries[0][0], "I64", entries[0][2])
    rejected(INT4, infos(*entries), "weight_packed", "I64[2048, 896]")
    entries = kimi_expert()
    entries[2] = (entries[2][0], "I32", (3,))
    rejected(INT4, infos(*entries), "weight_shape", "I32[3]", "I32/I64[2]")
    entries = kimi_expert()
    entries[1] = (entries[1][0], "F8_E4M3", entries[1][2])
    rejected(INT4, infos(*entries), "weight_scale", "F8_E4M3")
    zero_point = infos(*kimi_expert(), ("model.layers.1.mlp.experts.0.gate_proj.weight_zero_point", "I32", (256, 224)))
    rejected(INT4, zero_point, "weight_zero_point", "is stored, but", "symmetric int4")


def test_check_packed_shape():
    weight = group_weights(INT4, infos(*kimi_expert()), "base")["model.layers.1.mlp.experts.0.gate_proj.weight"]
    check_packed_shape(weight, [2048, 7168], "base/model-00001.safetensors")
    with pytest.raises(InputError) as info:
        check_packed_shape(weight, [7168, 2048], "base/model-00001.safetensors")
    assert str(info.value).startswith("base/model-00001.safetensors: tensor model.layers.1.mlp.experts.0.gate_proj"
                                      ".weight_shape: holds [7168, 2048] but")


def test_plain_tensors_are_left_out():
    plain = infos(("model.embed_tokens.weight", "BF16", (96, 64)), ("lm_head.weight", "BF16", (96, 64)))
    for scheme in (FP8, MXFP4):
        assert group_weights(scheme, plain, "base") == {}
    # a compressed-tensors config group that names no stored tensor is refused by name
    rejected(INT4, plain, "quantization_config.config_groups.group_0", "names no stored tensor", "['Linear']")


def test_the_module_is_torch_free():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['numpy'] = None; "
            "import merge_core.format.quantization, merge_core.format.codecs")
    subprocess.run([sys.executable, "-c", code], check=True)
