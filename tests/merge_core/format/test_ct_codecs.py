"""compressed-tensors' formats piece by piece against the library's own functions: packing, e2m1 and MX
rounding, qparams, activation ordering; and every malformed layout refused naming the tensor or key."""

from __future__ import annotations

import copy

import pytest
import torch

from merge_core.errors import InputError
from merge_core.format.codecs import ct_math, ct_packing, decode, encode, group_weights, read_scheme
from merge_core.format.quantization import QuantArgs
from tests.quantized_models import infos_of as infos

WHERE = "base/config.json"


def ct_args(**fields):
    from compressed_tensors.quantization import QuantizationArgs
    return QuantizationArgs(**fields)


def ours(args) -> QuantArgs:
    dtype = str(args.scale_dtype).removeprefix("torch.") if args.scale_dtype is not None else None
    return QuantArgs(args.num_bits, args.type, args.strategy, symmetric=args.symmetric, group_size=args.group_size,
                     block=tuple(args.block_structure) if args.block_structure else None, scale_dtype=dtype)


# ---------------------------------------------------------------- the arithmetic, against the library


@pytest.mark.parametrize("bits", range(1, 9))
def test_int32_packing_is_pack_to_int32(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    g = torch.Generator().manual_seed(bits)
    for columns in (32, 40, 7):
        codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (5, columns), generator=g, dtype=torch.int8)
        packed = ct_packing.pack_int32(codes, bits)
        assert torch.equal(packed, pack_to_int32(codes, bits))
        assert torch.equal(ct_packing.unpack_int32(packed, bits, columns), codes)
        assert torch.equal(unpack_from_int32(packed, bits, torch.Size((5, columns))), codes)
        rows = codes.t().contiguous()  # zero points are packed down the rows
        assert torch.equal(ct_packing.pack_rows_int32(rows, bits), pack_to_int32(rows, bits, packed_dim=0))
        assert torch.equal(ct_packing.unpack_rows_int32(ct_packing.pack_rows_int32(rows, bits), bits, columns), rows)


def test_e2m1_rounding_and_packing_are_cast_to_fp4_and_pack_fp4_to_uint8():
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8
    from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    values = torch.cat([ties, -ties, ties.nextafter(torch.tensor(9.0)), torch.tensor([0.0, -0.0, -0.1, 0.1, 7.0]),
                        torch.linspace(-6, 6, 97)])
    values = values[: values.numel() // 2 * 2].reshape(1, -1)
    rounded = ct_math.round_e2m1(values)
    expected = cast_to_fp4(values.clone())
    assert torch.equal(rounded, expected) and torch.equal(torch.signbit(rounded), torch.signbit(expected))
    packed = ct_packing.pack_e2m1(rounded)
    assert torch.equal(packed, pack_fp4_to_uint8(expected))
    unpacked = ct_packing.unpack_e2m1(packed)
    assert torch.equal(unpacked, unpack_fp4_from_uint8(packed, 1, values.shape[1], dtype=torch.float32))


def test_mx_scales_are_generate_mx_scales():
    from compressed_tensors.quantization.utils.mxfp_utils import generate_mx_scales
    amax = torch.cat([torch.tensor([0.0, 2.0 ** -130, 1.5, 1.75, 1.7499, 6.0, 448.0, 3e38]),
                      torch.rand(200) * torch.exp2(torch.randint(-40, 40, (200,)).float())])
    for bits in (4, 8):
        expected = torch.round(generate_mx_scales(amax, bits).clamp(0, 255))
        assert torch.equal(ct_math.mx_exponent(amax, bits), expected)


QPARAMS = {
    "int8 channel": dict(num_bits=8, type="int", strategy="channel", symmetric=True),
    "int4 asymmetric group": dict(num_bits=4, type="int", strategy="group", group_size=32, symmetric=False),
    "int8 asymmetric tensor": dict(num_bits=8, type="int", strategy="tensor", symmetric=False),
    "fp8 block": dict(num_bits=8, type="float", strategy="block", block_structure=[16, 16], symmetric=True),
    "nvfp4": dict(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True,
                  scale_dtype=torch.float8_e4m3fn),
    "mxfp4": dict(num_bits=4, type="float", strategy="group", group_size=32, symmetric=True, scale_dtype=torch.uint8),
    "mxfp8": dict(num_bits=8, type="float", strategy="group", group_size=32, symmetric=True, scale_dtype=torch.uint8),
}


@pytest.mark.parametrize("name", list(QPARAMS))
def test_qparams_are_calculate_qparams(name):
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam
    args = ct_args(**QPARAMS[name])
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(48, 64, generator=g) * 0.05
    weight[0] = 0.0  # an all-zero row: the eps replacement
    weight[1] = weight[1].abs()  # all positive: min clamped to 0
    grid = ct_math.Grid(ours(args), 48, 64)
    low, high = grid.bounds(weight)
    global_scale = generate_gparam(weight.amin(), weight.amax()) if args.strategy == "tensor_group" else None
    if global_scale is not None:
        assert torch.equal(ct_math.generate_gparam(weight.amin(), weight.amax()), global_scale)
    scale, zero = ct_math.calculate_qparams(low, high, ours(args), global_scale)
    expected_scale, expected_zero = calculate_qparams(low, high, args, global_scale)
    assert torch.equal(scale, expected_scale.float()) and torch.equal(zero, expected_zero.float())


# ---------------------------------------------------------------- activation ordering (weight_g_idx)


def actorder_weight(rows: int = 8, columns: int = 64, group: int = 16):
    """A packed int4 weight whose columns belong to groups by a permutation, as GPTQ's activation ordering
    stores them: g_idx[j] = the group of column j."""
    scheme = read_scheme({"quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
            "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": group,
                                               "symmetric": True, "actorder": "group"}}}}}, WHERE)
    stored = infos(("m.weight_packed", "I32", (rows, columns // 8)),
                   ("m.weight_scale", "BF16", (rows, columns // group)),
                   ("m.weight_shape", "I64", (2,)), ("m.weight_g_idx", "I32", (columns,)))
    return group_weights(scheme, stored, "base")["m.weight"]


def test_activation_ordering_groups_columns_by_g_idx():
    """Each column uses its g_idx group's scale; fresh scales cover the columns each group names (the
    library quantizes the columns sorted by g_idx in contiguous groups)."""
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    weight = actorder_weight()
    assert weight.roles == ("codes", "scale", "shape", "g_idx")
    g = torch.Generator().manual_seed(5)
    order = torch.randperm(64, generator=g)
    g_idx = torch.empty(64, dtype=torch.int32)
    g_idx[order] = torch.arange(64, dtype=torch.int32) // 16
    values = torch.randn(8, 64, generator=g)
    stored = {"g_idx": g_idx, "shape": torch.tensor([8, 64])}
    parts = encode(weight, values, stored)
    args = ct_args(num_bits=4, type="int", strategy="group", group_size=16, symmetric=True)
    sorted_columns = values[:, torch.argsort(g_idx, stable=True)]
    groups = sorted_columns.unflatten(1, (4, 16))
    scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    assert torch.equal(parts["scale"], scale.to(torch.bfloat16))
    codes = quantize(sorted_columns, parts["scale"], None, args, dtype=torch.int8)
    expected = torch.empty_like(codes)
    expected[:, torch.argsort(g_idx, stable=True)] = codes
    assert torch.equal(ct_packing.unpack_int32(parts["codes"], 4, 64), expected)
    decoded = decode(weight, parts)
    assert torch.equal(decoded, expected.float() * parts["scale"].float()[:, g_idx.long()])
    kept = encode(weight, decoded, parts, keep=True)
    assert all(torch.equal(kept[r], parts[r]) for r in weight.roles)


# ---------------------------------------------------------------- layouts refused, naming the tensor or key


NVFP4_CONFIG = {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "config_groups": {
    "group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group",
                                                   "group_size": 16, "symmetric": True,
                                                   "scale_dtype": "torch.float8_e4m3fn"}}}}
NVFP4 = read_scheme({"quantization_config": NVFP4_CONFIG}, WHERE)


def nvfp4_module(prefix: str = "m", rows: int = 32, columns: int = 64, **change) -> list:
    parts = {"weight_packed": ("U8", (rows, columns // 2)), "weight_scale": ("F8_E4M3", (rows, columns // 16)),
             "weight_global_scale": ("F32", (1,)), "input_global_scale": ("F32", (1,))} | change
    return [(f"{prefix}.{k}", dtype, shape) for k, (dtype, shape) in parts.items() if dtype]


def test_nvfp4_layout_carries_the_activations_global_scale():
    weight = group_weights(NVFP4, infos(*nvfp4_module()), "base")["m.weight"]
    assert (weight.codec, weight.shape, weight.dtype) == ("ct_nvfp4", (32, 64), "BF16")
    assert weight.roles == ("codes", "scale", "global_scale", "input_global_scale")


@pytest.mark.parametrize("change, fragments", [
    ({"weight_scale": ("F8_E4M3", (32, 2))}, ["tensor m.weight_scale", "F8_E4M3[32, 2]", "F8_E4M3[32, 4]"]),
    ({"weight_scale": ("BF16", (32, 4))}, ["tensor m.weight_scale", "BF16[32, 4]"]),
    ({"weight_global_scale": ("F32", (2,))}, ["tensor m.weight_global_scale", "F32[2]", "F32[1]"]),
    ({"weight_global_scale": ("BF16", (1,))}, ["tensor m.weight_global_scale", "BF16[1]"]),
    ({"weight_global_scale": (None, None)}, ["module m", "has no weight_global_scale"]),
    ({"weight_packed": ("I32", (32, 8))}, ["tensor m.weight_packed", "is I32", "two e2m1 codes a byte"]),
    ({"weight_packed": (None, None)}, ["tensor m.weight_scale", "has no m.weight_packed"]),
    ({"weight_zero_point": ("I8", (32, 4))}, ["tensor m.weight_zero_point", "is stored, but"]),
])
def test_misshapen_parts_are_refused_by_name(change, fragments):
    with pytest.raises(InputError) as info:
        group_weights(NVFP4, infos(*nvfp4_module(**change)), "base")
    assert str(info.value).startswith("base"), str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def nvfp4_with(**weights) -> dict:
    config = copy.deepcopy(NVFP4_CONFIG)
    config["config_groups"]["group_0"]["weights"].update(weights)
    return config


@pytest.mark.parametrize("config, fragments", [
    (nvfp4_with(group_size=32), ["group_0.weights.group_size", "32", "groups of 16"]),
    (nvfp4_with(num_bits=8), ["group_0.weights.num_bits", "8"]),
    (nvfp4_with(strategy="group"), ["group_0.weights.strategy", "'group'"]),
    (NVFP4_CONFIG | {"format": "int-quantized"}, ["group_0.weights.strategy", "'tensor_group'"]),
    (nvfp4_with(num_bits=16, type="int", strategy="channel", group_size=None) | {"format": "int-quantized"},
     ["group_0.weights.num_bits", "16", "int8"]),
    (nvfp4_with(num_bits=4, strategy="channel", group_size=None) | {"format": "float-quantized"},
     ["group_0.weights.num_bits", "float8_e4m3fn"]),
    (nvfp4_with(group_size=32, strategy="group", scale_dtype="torch.bfloat16") | {"format": "mxfp4-pack-quantized"},
     ["group_0.weights.scale_dtype", "'bfloat16'", "E8M0"]),
])
def test_strategies_and_widths_a_format_cannot_hold_are_refused(config, fragments):
    with pytest.raises(InputError) as info:
        read_scheme({"quantization_config": config}, WHERE)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_modules_and_groups_must_meet():
    two = copy.deepcopy(NVFP4_CONFIG)
    two["config_groups"]["group_0"]["targets"] = ["re:.*mlp.*"]
    two["config_groups"]["group_1"] = copy.deepcopy(two["config_groups"]["group_0"]) | {"targets": ["re:.*attn.*"]}
    scheme = read_scheme({"quantization_config": two}, WHERE)
    with pytest.raises(InputError, match="config_groups.group_1: names no stored tensor"):
        group_weights(scheme, infos(*nvfp4_module("layers.0.mlp.up_proj")), "base")
    with pytest.raises(InputError, match="tensor x.weight_scale: is a quantized weight's scale, but no config group "
                                         "targets x"):
        group_weights(scheme, infos(*nvfp4_module("layers.0.mlp.up_proj"), *nvfp4_module("layers.0.attn.q"),
                                    *nvfp4_module("x")), "base")
    with pytest.raises(InputError, match="tensor m.weight_global_scale: has no m.weight_scale beside it"):
        group_weights(NVFP4, infos(("m.weight_global_scale", "F32", (1,))), "base")


def test_a_later_group_and_a_narrower_target_win():
    """As apply_quantization_config gives a module its scheme: a name beats a pattern, which beats a class."""
    from merge_core.format.codecs.compressed_tensors import group_of
    from merge_core.format.codecs.ct_config import ConfigGroup
    args = QuantArgs(8, "int", "channel")
    groups = [ConfigGroup("a", ("Linear",), args, "int-quantized"),
              ConfigGroup("b", ("re:.*mlp.*",), args, "int-quantized"),
              ConfigGroup("c", ("layers.0.mlp.down_proj", "re:.*mlp.*"), args, "int-quantized")]
    assert group_of(groups, "layers.0.mlp.down_proj").key == "c"
    assert group_of(groups, "layers.0.mlp.up_proj").key == "c"  # the same pattern, later group
    assert group_of(groups, "layers.0.self_attn.q_proj").key == "a"
    assert group_of(groups[1:], "layers.0.self_attn.q_proj") is None


def test_zero_points_of_the_wrong_layout_are_refused_by_name():
    """Asymmetric packed weights keep their zero points packed down the rows (I32), per tensor unpacked (I8)."""
    config = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32,
                                           "symmetric": False}}}}
    scheme = read_scheme({"quantization_config": config}, WHERE)
    good = [("m.weight_packed", "I32", (64, 8)), ("m.weight_scale", "BF16", (64, 2)), ("m.weight_shape", "I64", (2,))]
    weight = group_weights(scheme, infos(*good, ("m.weight_zero_point", "I32", (8, 2))), "base")["m.weight"]
    assert weight.roles == ("codes", "scale", "zero_point", "shape")
    for zero_point, fragments in ((("I8", (64, 2)), ["is I8[64, 2]", "make I32[8, 2]"]),
                                  (("I32", (64, 2)), ["is I32[64, 2]", "make I32[8, 2]"]),
                                  (None, ["module m", "has no weight_zero_point"])):
        stored = infos(*good, *([("m.weight_zero_point", *zero_point)] if zero_point else []))
        with pytest.raises(InputError) as info:
            group_weights(scheme, stored, "base")
        for fragment in fragments:
            assert fragment in str(info.value), str(info.value)
