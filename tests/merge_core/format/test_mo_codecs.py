"""ModelOpt's and fbgemm's FP8 formats piece by piece: the float64 references of tests/modelopt_models.py
checked against what implements the same math elsewhere (torch's e4m3 cast, compressed-tensors' NVFP4
rounding, packing and quantize, ModelOpt's own _cast_fp4 and _compute_e8m0_exponent as written there), then
each codec against those references (decode, fresh and kept encode, the edges: zero rows, blocks far below
the weight's amax, exact powers of two); and every malformed layout or setting refused naming the tensor or key.
"""

from __future__ import annotations

import pytest
import torch

from merge_core.errors import InputError
from merge_core.format.codecs import decode, encode, group_weights, read_scheme
from merge_core.format.codecs.mo_mxfp8 import e8m0_exponent
from tests.modelopt_models import (
    E4M3_GRID,
    FORMATS,
    NV_GROUP,
    _ceil_log2,
    e2m1_codes,
    e4m3_nearest,
    fbgemm_quantize,
    nvfp4_quantize,
    pack_low_first,
    unpack_low_first,
)
from tests.quantized_models import infos_of

WHERE = "base/config.json"
ROLES = {"weight": "codes", "weight_scale": "scale", "weight_scale_2": "global_scale", "input_scale": "input_scale"}


def modelopt(algo: str, **more) -> dict:
    return {"quantization_config": {"quant_method": "modelopt", "quant_algo": algo} | more}


def scheme_of(algo: str):
    if algo == "fbgemm_fp8":
        return read_scheme({"quantization_config": {"quant_method": "fbgemm_fp8"}}, WHERE)
    return read_scheme(modelopt(algo), WHERE)


# ---------------------------------------------------------------- the references, against other implementations


def test_e4m3_reference_is_torchs_cast():
    """Every midpoint between neighbouring e4m3 values (ties), just either side of it, the subnormals and a
    spread of magnitudes: the float64 nearest-value search is torch's float32 → float8_e4m3fn cast."""
    grid = E4M3_GRID.float()
    midpoints = (grid[:-1] + grid[1:]) / 2  # exact in float32
    g = torch.Generator().manual_seed(0)
    values = torch.cat([grid, midpoints, midpoints.nextafter(torch.tensor(0.0)), midpoints.nextafter(torch.tensor(1e9)),
                        torch.randn(4000, generator=g) * torch.exp2(torch.randint(-14, 9, (4000,), generator=g)),
                        torch.tensor([0.0, -0.0, 2.0 ** -11, 2.0 ** -10])])
    values = torch.cat([values, -values]).clamp(-448, 448)
    assert torch.equal(e4m3_nearest(values).view(torch.uint8), values.to(torch.float8_e4m3fn).view(torch.uint8))


def modelopt_cast_fp4(weight: torch.Tensor) -> torch.Tensor:
    """NVFP4QTensor._cast_fp4 (modelopt/torch/quantization/qtensor/nvfp4_tensor.py) as written there: the index
    of the value among e2m1_bounds, one up on the odd bounds 0.75, 1.75, 3.5 (ties to even), the sign bit for
    values below zero."""
    bounds = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5])
    sign_bit = (weight < 0).to(torch.uint8)
    magnitude = weight.abs()
    index = torch.searchsorted(bounds, magnitude, out_int32=True).to(torch.uint8)
    on_odd = torch.any(magnitude.unsqueeze(-1) == bounds[[1, 3, 5]], dim=-1).to(torch.uint8)
    return (sign_bit << 3) + index + on_odd


def test_e2m1_reference_is_modelopts_cast_fp4_and_compressed_tensors_cast_and_packing():
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    values = torch.cat([ties, -ties, ties.nextafter(torch.tensor(9.0)), ties.nextafter(torch.tensor(0.0)),
                        torch.tensor([0.0, -0.0, -0.1, 0.1, 7.0, -7.0]), torch.linspace(-6, 6, 98)]).reshape(1, -1)
    codes = e2m1_codes(values)
    assert torch.equal(codes, modelopt_cast_fp4(values))
    assert torch.equal(pack_low_first(codes), pack_fp4_to_uint8(cast_to_fp4(values.clone())))
    assert torch.equal(unpack_low_first(pack_low_first(codes)), cast_to_fp4(values.clone()).double())


def test_nvfp4_reference_is_compressed_tensors_quantize_where_the_global_scale_is_a_power_of_two():
    """compressed-tensors stores NVFP4's global scale as a divisor g and ModelOpt's weight_scale_2 as a
    multiplier: with weight_scale_2 = 2^-k (g = 2^k, both exact) the block scales amax/6 · g and amax /
    (6 · weight_scale_2) and the codes x / (s / g) and x / (s · weight_scale_2) are the same float32 numbers."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    args = QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=NV_GROUP, symmetric=True,
                            scale_dtype=torch.float8_e4m3fn)
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(32, 64, generator=g) * 0.05
    scale_2 = torch.tensor(2.0 ** -12)
    ours = nvfp4_quantize(weight, scale_2=scale_2)
    groups = weight.unflatten(1, (-1, NV_GROUP))
    global_scale = (1 / scale_2).reshape(1)
    scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), args, global_scale=global_scale)
    scale = scale.to(torch.float8_e4m3fn)
    assert torch.equal(ours["weight_scale"].view(torch.uint8), scale.view(torch.uint8))
    codes = quantize(weight, scale.float(), None, args, global_scale=global_scale)
    assert torch.equal(unpack_low_first(ours["weight"]).float(), codes)


def test_e8m0_exponent_is_modelopts_ceil_log2_and_the_reference():
    """MXFP8QTensor._compute_e8m0_exponent: ceil(log2(amax / 448)), -127 for 0, clamped to [-127, 127]. An exact
    power of two has its own exponent (not the next one up); elsewhere torch.log2 may land an ulp off an integer,
    so the comparison with it leaves out quotients within 1e-5 of a power of two."""
    g = torch.Generator().manual_seed(2)
    powers = 448.0 * torch.exp2(torch.arange(-20.0, 20.0))
    spread = torch.rand(2000, generator=g) * torch.exp2(torch.randint(-30, 30, (2000,), generator=g).float())
    amax = torch.cat([powers, spread, torch.tensor([0.0, 1e-40, 3e38])])
    quotient = amax / 448.0
    reference = torch.tensor([_ceil_log2(q) for q in quotient.tolist()], dtype=torch.float32)
    assert torch.equal(e8m0_exponent(amax), reference)
    exact_log2 = torch.log2(quotient)
    clear = (amax > 0) & ((exact_log2 - exact_log2.round()).abs() > 1e-5) | (amax == 448.0 * 2.0 ** -7)
    modelopt = torch.ceil(exact_log2).clamp(-127, 127)
    assert torch.equal(e8m0_exponent(amax)[clear], modelopt[clear])
    assert e8m0_exponent(torch.tensor([448.0 * 2.0 ** -7])).item() == -7


def test_fbgemm_reference_is_torchs_cast_of_the_float32_quotient_and_floors_the_scale():
    """quantize_fp8_per_row divides in float32 and converts with saturation; an all-zero row takes the floor
    1 / (448 · 512) as its scale."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(8, 64, generator=g) * 0.03
    weight[2] = 0
    ours = fbgemm_quantize(weight)
    assert ours["weight_scale"].shape == (8, 1)
    assert ours["weight_scale"][2].item() == torch.tensor(1 / (448 * 512), dtype=torch.float32).item()
    expected = (weight / ours["weight_scale"]).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(ours["weight"].view(torch.uint8), expected.view(torch.uint8))


# ---------------------------------------------------------------- each codec against the references


def edgy_weight(rows: int = 160, columns: int = 192) -> torch.Tensor:
    """Partial 128×128 edge blocks, an all-zero row, a block of 16 far below the weight's amax (NVFP4's block
    scale clamped to 2^-9), a group of 32 whose amax is 448 · 2^-10 exactly (MXFP8's exponent on a power of
    two) and values on e2m1's ties against their block's scale."""
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(rows, columns, generator=g) * 0.02
    weight[3] = 0
    weight[5, :16] = 1e-9
    weight[7, 32:64] = weight[7, 32:64].clamp(-0.4, 0.4)
    weight[7, 40] = 448 * 2.0 ** -10
    return weight


def stored(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(infos for group_weights, parts by role) of module `m` stored as the reference's state."""
    state = state | {"input_scale": torch.tensor(0.0625)}
    names = {f"m.{key}": value for key, value in state.items()}
    dtypes = {torch.uint8: "U8", torch.float8_e4m3fn: "F8_E4M3", torch.float32: "F32"}
    infos = infos_of(*((name, dtypes[t.dtype], tuple(t.shape)) for name, t in sorted(names.items())))
    return infos, {ROLES[key]: value for key, value in state.items()}


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("algo", list(FORMATS))
def test_each_codec_decodes_and_encodes_as_the_reference(algo):
    quantize, dequantize, scale_parts = FORMATS[algo]
    weight = edgy_weight()
    state = quantize(weight)
    infos, parts = stored(state)
    if algo == "fbgemm_fp8":
        infos.pop("m.input_scale"), parts.pop("input_scale")
    (quantized,) = group_weights(scheme_of(algo), infos, "base").values()
    assert torch.equal(decode(quantized, parts), dequantize(state))
    fresh = encode(quantized, weight, parts)
    assert all(same_bytes(fresh[ROLES[key]], value) for key, value in state.items()), algo
    g = torch.Generator().manual_seed(5)
    merged = weight + torch.randn(weight.shape, generator=g) * 0.01
    merged[11] *= 40  # past the kept scales' range: saturates
    kept = encode(quantized, merged, parts, keep=True)
    keywords = {"weight_scale": "scale", "weight_scale_2": "scale_2"}
    expected = quantize(merged, **{keywords[p]: state[p] for p in scale_parts})
    assert all(same_bytes(kept[ROLES[key]], value) for key, value in expected.items()), algo
    assert all(same_bytes(kept[role], parts[role]) for role in ("input_scale",) if role in parts)


def test_nvfp4_siblings_given_one_weight_scale_2_use_it():
    weight = edgy_weight(32, 64)
    scale_2 = torch.tensor(weight.abs().max().item() * 3 / (6 * 448), dtype=torch.float32)
    infos, parts = stored(nvfp4_quantize(weight))
    (quantized,) = group_weights(scheme_of("NVFP4"), infos, "base").values()
    fresh = encode(quantized, weight, parts, fixed={"global_scale": scale_2})
    expected = nvfp4_quantize(weight, scale_2=scale_2)
    assert all(same_bytes(fresh[ROLES[key]], value) for key, value in expected.items())


# ---------------------------------------------------------------- layouts and settings refused, by name


def module(prefix: str, parts: dict) -> dict:
    return infos_of(*((f"{prefix}.{k}", dtype, shape) for k, (dtype, shape) in parts.items() if dtype))


def nvfp4_module(rows: int = 32, columns: int = 64, prefix: str = "m", **change) -> dict:
    return module(prefix, {"weight": ("U8", (rows, columns // 2)), "weight_scale": ("F8_E4M3", (rows, columns // 16)),
                           "weight_scale_2": ("F32", ()), "input_scale": ("F32", ())} | change)


def fp8_module(prefix: str = "m", **change) -> dict:
    return module(prefix, {"weight": ("F8_E4M3", (32, 64)), "weight_scale": ("F32", ())} | change)


@pytest.mark.parametrize("algo, infos, fragments", [
    ("NVFP4", nvfp4_module(weight_scale_2=(None, None)), ["module m", "has no m.weight_scale_2"]),
    ("NVFP4", nvfp4_module(weight_scale=("F8_E4M3", (32, 2))), ["tensor m.weight_scale", "F8_E4M3[32, 2]",
                                                                "F8_E4M3[32, 4]"]),
    ("NVFP4", nvfp4_module(weight_scale_2=("F32", (2,))), ["tensor m.weight_scale_2", "F32[2]", "one F32 value"]),
    ("NVFP4", nvfp4_module(weight=("F8_E4M3", (32, 64))), ["tensor m.weight", "F8_E4M3[32, 64]", "2-D U8"]),
    ("NVFP4", nvfp4_module(weight=(None, None)), ["tensor m.weight_scale", "has no m.weight beside it"]),
    ("NVFP4", nvfp4_module(columns=40, weight_scale=("F8_E4M3", (32, 2))), ["tensor m.weight", "40 columns",
                                                                            "groups of 16"]),
    ("NVFP4", nvfp4_module(input_scale=("BF16", ())), ["tensor m.input_scale", "BF16[]"]),
    ("FP8", fp8_module(weight_scale=("F32", (2,))), ["tensor m.weight_scale", "F32[2]", "F32[]"]),
    ("FP8", fp8_module(weight_scale_2=("F32", ())), ["tensor m.weight_scale_2", "is stored, but"]),
    ("FP8_PB_WO", fp8_module(weight_scale=("F32", (1, 2))), ["tensor m.weight_scale", "F32[1, 1, 1, 1]"]),
    ("MXFP8", fp8_module(weight_scale=("F32", (32, 2))), ["tensor m.weight_scale", "U8[32, 2]"]),
    ("FP8", infos_of(("m.weight_scale_2", "F32", ())), ["tensor m.weight_scale_2", "has no m.weight_scale"]),
    ("fbgemm_fp8", fp8_module(weight_scale=(None, None)), ["tensor m.weight", "F8_E4M3", "no m.weight_scale"]),
    ("fbgemm_fp8", fp8_module(weight_scale=("F32", (32,))), ["tensor m.weight_scale", "F32[32]", "F32[32, 1]"]),
])
def test_misshapen_parts_are_refused_by_name(algo, infos, fragments):
    with pytest.raises(InputError) as info:
        group_weights(scheme_of(algo), infos, "base")
    assert str(info.value).startswith("base"), str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("config, fragments", [
    (modelopt("W4A8_AWQ"), ["quantization_config.quant_algo", "'W4A8_AWQ'", "supported: NVFP4, W4A16_NVFP4, FP8",
                            "MXFP8, MIXED_PRECISION"]),
    (modelopt("NVFP4", group_size=32), ["quantization_config.group_size", "32", "16 values"]),
    (modelopt("MIXED_PRECISION"), ["quantization_config.quantized_layers", "MIXED_PRECISION needs"]),
    (modelopt("MIXED_PRECISION", quantized_layers={"m": {"quant_algo": "INT4_AWQ"}}),
     ["quantized_layers.m.quant_algo", "'INT4_AWQ'", "supported: NVFP4"]),
    ({"quantization_config": {"quant_method": "modelopt", "quantization": {"quant_algo": "FP8_BLOCK"}}},
     ["quantization_config.quantization.quant_algo", "'FP8_BLOCK'"]),
    ({"quantization_config": {"quant_method": "fbgemm_fp8", "activation_scale_ub": "big"}},
     ["quantization_config.activation_scale_ub", "'big'"]),
])
def test_settings_lora_merge_cannot_keep_are_refused_listing_what_it_can(config, fragments):
    with pytest.raises(InputError) as info:
        read_scheme(config, WHERE)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_hf_quant_config_beside_config_json_declares_the_format_and_mixed_precision_names_each_layer():
    beside = {"hf_quant_config.json": ({"producer": {"name": "modelopt"}, "quantization": {
        "quant_algo": "MIXED_PRECISION", "quantized_layers": {
            "a": {"quant_algo": "FP8"}, "m": {"quant_algo": "NVFP4", "group_size": 16},
            "w": {"quant_algo": "W4A16_NVFP4", "group_size": 16}}}}, "base/hf_quant_config.json")}
    scheme = read_scheme({}, WHERE, beside)
    assert scheme.config_files == ("hf_quant_config.json",)
    weight_only = nvfp4_module(prefix="w", input_scale=(None, None))  # Qwen3.6 NVFP4's experts: no input_scale
    weights = group_weights(scheme, nvfp4_module() | fp8_module("a") | weight_only, "base")
    assert {n: w.codec for n, w in weights.items()} == {"a.weight": "modelopt_fp8", "m.weight": "modelopt_nvfp4",
                                                         "w.weight": "modelopt_nvfp4"}
    with pytest.raises(InputError) as info:
        group_weights(scheme, nvfp4_module() | fp8_module("b"), "base")
    assert "tensor b.weight_scale" in str(info.value) and "quantized_layers has no entry for b" in str(info.value)
