"""Packed INT4 codec against compressed-tensors itself (packing, calculate_qparams + quantize, dequantize), and a
Kimi-style checkpoint as transformers loads it."""

from __future__ import annotations

import warnings

import pytest
import torch

from merge_core.format.codecs import decode, encode, int4_packed
from merge_core.format.codecs.int4_packed import check_packed_shape
from merge_core.format.header import TensorInfo
from merge_core.format.quantization import QuantizedWeight
from tests.quantized_models import (
    decode_checkpoint,
    fuse_experts,
    int4_reference_dequantize,
    int4_reference_quantize,
    quantized_weights,
    save_int4_kimi_style,
    stored_tensors,
)

pytest.importorskip("compressed_tensors")


def described(rows: int, cols: int, group: int = 32, scale_dtype: str = "BF16") -> QuantizedWeight:
    parts = (("packed", TensorInfo(name="x.weight_packed", dtype="I32", shape=(rows, cols // 8), start=0, end=0)),
             ("scale", TensorInfo(name="x.weight_scale", dtype=scale_dtype, shape=(rows, cols // group), start=0,
                                  end=0)),
             ("shape", TensorInfo(name="x.weight_shape", dtype="I32", shape=(2,), start=0, end=0)))
    return QuantizedWeight("x.weight", "int4_packed", parts, (rows, cols), group_size=group)


def weight_like(rows=48, cols=256, seed=0) -> torch.Tensor:
    """Rows of very different magnitudes, an all-zero group, and a group of exact .5 ties."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g) * torch.logspace(-6, 2, rows).unsqueeze(1)
    weight[0, :32] = 0.0
    weight[1, :32] = TIES
    return weight


TIES = torch.cat([torch.arange(-15, 16) * 0.25, torch.zeros(1)])  # amax 3.75: scale 0.5, every odd k/2 a tie


def test_pack_and_unpack_are_compressed_tensors():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    codes = torch.randint(-8, 8, (24, 128), dtype=torch.int8)
    codes[0, :8] = torch.tensor([-8, 7, -1, 0, 1, -8, 7, 7], dtype=torch.int8)  # sign bit of the word set
    packed = int4_packed.pack(codes)
    assert packed.dtype == torch.int32 and torch.equal(packed, pack_to_int32(codes, 4))
    assert torch.equal(int4_packed.unpack(packed), codes)
    assert torch.equal(int4_packed.unpack(packed), unpack_from_int32(packed, 4, torch.Size((24, 128))))


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_quantize_is_calculate_qparams_and_quantize(scale_dtype):
    weight = weight_like()
    packed, scale = int4_packed.quantize(weight, 32, scale_dtype)
    ref_packed, ref_scale = int4_reference_quantize(weight, 32, scale_dtype)
    assert scale.dtype == scale_dtype and torch.equal(scale, ref_scale)
    assert torch.equal(packed, ref_packed)
    assert float(scale[0, 0]) == torch.finfo(torch.float32).eps  # the all-zero group (eps of the float32 qparams)
    assert float(scale[1, 0]) == 0.5
    expected = [round(min(max(x / 0.5, -8), 7)) for x in TIES.tolist()]  # Python rounds half to even
    assert int4_packed.unpack(packed)[1, :32].tolist() == expected


@pytest.mark.parametrize("group", [32, 128])
def test_dequantize_is_compressed_tensors(group):
    weight = weight_like()
    packed, scale = int4_reference_quantize(weight, group)
    ours = int4_packed.dequantize(packed, scale, group)
    assert ours.dtype == torch.float32 and ours.shape == (48, 256)
    assert torch.equal(ours.to(torch.bfloat16), int4_reference_dequantize(packed, scale, (48, 256), group))
    assert torch.equal(ours, int4_reference_dequantize(packed, scale.float(), (48, 256), group))  # exact


def test_requantizing_moves_the_scales_and_scales_from_does_not():
    """amax / 7.5 sends a group's largest value to ±7.5, stored as -8 or 7, so the dequantized amax is 8 or 7
    scales and requantizing multiplies the scale by 16/15 or 14/15 (then rounds it to bf16). With the base's
    scales kept, the weight comes back bit for bit."""
    weight = described(48, 256)
    packed, scale = int4_reference_quantize(weight_like(), 32)
    parts = {"packed": packed, "scale": scale, "shape": torch.tensor([48, 256], dtype=torch.int32)}
    values = decode(weight, parts)
    fresh = encode(weight, values)
    ratio = (fresh["scale"].float() / scale.float()).flatten()[1:]  # but the all-zero group
    assert torch.all(((ratio - 16 / 15).abs() < 0.01) | ((ratio - 14 / 15).abs() < 0.01))
    kept = encode(weight, values, scales_from=parts)
    assert torch.equal(kept["packed"], packed) and torch.equal(kept["scale"], scale)
    assert torch.equal(kept["shape"], parts["shape"])


def test_codes_against_kept_scales_saturate():
    weight = described(48, 256)
    packed, scale = int4_reference_quantize(weight_like(), 32)
    parts = {"packed": packed, "scale": scale, "shape": torch.tensor([48, 256], dtype=torch.int32)}
    values = decode(weight, parts)
    values[5, 3], values[5, 4] = 1e9, -1e9
    codes = int4_packed.unpack(encode(weight, values, scales_from=parts)["packed"])
    assert codes[5, 3] == 7 and codes[5, 4] == -8


def test_encode_gives_the_stored_dtypes_and_shapes():
    weight = described(48, 256, scale_dtype="F16")
    parts = encode(weight, weight_like())
    assert {role: (t.dtype, tuple(t.shape)) for role, t in parts.items()} == {
        "packed": (torch.int32, (48, 32)), "scale": (torch.float16, (48, 8)), "shape": (torch.int32, (2,))}
    assert parts["shape"].tolist() == [48, 256]
    check_packed_shape(weight, parts["shape"].tolist(), "base")


def test_kimi_style_checkpoint_decodes_as_transformers_loads_it(tmp_path):
    from transformers import CompressedTensorsConfig, DeepseekV3ForCausalLM

    checkpoint = save_int4_kimi_style(str(tmp_path / "int4"))
    weights = quantized_weights(checkpoint.path)
    assert sorted(weights) == sorted(f"model.layers.1.mlp.experts.{e}.{proj}.weight" for e in range(4)
                                     for proj in ("gate_proj", "up_proj", "down_proj"))
    stored = stored_tensors(checkpoint.path)
    for weight in weights.values():
        assert stored[weight.part("shape").name].dtype == torch.int32
        check_packed_shape(weight, stored[weight.part("shape").name].tolist(), checkpoint.path)
    ours = decode_checkpoint(checkpoint.path)
    assert all(torch.equal(ours[name], value) for name, value in checkpoint.exact.items())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = DeepseekV3ForCausalLM.from_pretrained(
            checkpoint.path, quantization_config=CompressedTensorsConfig(run_compressed=False), dtype=torch.bfloat16)
    loaded = model.state_dict()
    fused = fuse_experts({name: value.to(torch.bfloat16) for name, value in ours.items()})
    assert sorted(fused) == ["model.layers.1.mlp.experts.down_proj", "model.layers.1.mlp.experts.gate_up_proj"]
    assert all(torch.equal(loaded[name], value) for name, value in fused.items())
    plain = [n for n in checkpoint.dequantized if n in loaded and ".experts." not in n and "mlp.gate." not in n]
    assert len(plain) > 20 and all(torch.equal(loaded[n], checkpoint.dequantized[n]) for n in plain)
