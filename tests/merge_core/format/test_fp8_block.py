"""FP8 block codec against an independent float64 reference of DeepSeek's quantizer, and against transformers'
own dequantization of real checkpoints."""

from __future__ import annotations

import warnings

import pytest
import torch

from merge_core.format.codecs import decode, encode, fp8_block
from merge_core.format.header import TensorInfo
from merge_core.format.quantization import QuantizedWeight
from tests.quantized_models import (
    decode_checkpoint,
    fp8_reference_dequantize,
    fp8_reference_quantize,
    fuse_experts,
    quantized_weights,
    save_dequantized,
    save_fp8_deepseek_v3,
    save_fp8_llama,
)

BLOCK = (128, 128)
DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16"}


def weight_like(rows: int = 200, cols: int = 300, seed: int = 0) -> torch.Tensor:
    """Rows and columns of very different magnitudes, so that blocks get very different scales."""
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.logspace(-4, 1, rows).unsqueeze(1) * torch.logspace(0, 2, cols)
    return torch.randn(rows, cols, generator=g) * magnitude[torch.randperm(rows, generator=g)]


def described(shape, block=BLOCK, scale_dtype=torch.float32, scale_fmt="float") -> QuantizedWeight:
    scale_shape = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    codes = TensorInfo(name="x.weight", dtype="F8_E4M3", shape=tuple(shape), start=0, end=shape[0] * shape[1])
    scale = TensorInfo(name="x.weight_scale_inv", dtype=DTYPE_NAMES[scale_dtype], shape=scale_shape, start=0, end=0)
    return QuantizedWeight("x.weight", "fp8_block", (("codes", codes), ("scale", scale)), tuple(shape), block=block,
                           scale_fmt=scale_fmt)


def e4m3_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many e4m3 values apart two code tensors are (sign-magnitude bits mapped onto ordered integers)."""
    def ordered(x):
        bits = x.view(torch.uint8).to(torch.int32)
        return torch.where(bits >= 0x80, -(bits & 0x7F), bits)
    return (ordered(a) - ordered(b)).abs()


@pytest.mark.parametrize("scale_dtype, ue8m0", [(torch.float32, False), (torch.float32, True),
                                                (torch.bfloat16, False), (torch.bfloat16, True)])
def test_quantize_matches_the_float64_reference(scale_dtype, ue8m0):
    weight = weight_like()
    codes, scale = fp8_block.quantize(weight, BLOCK, scale_dtype, ue8m0)
    ref_codes, ref_scale = fp8_reference_quantize(weight, BLOCK, scale_dtype, ue8m0)
    assert scale.dtype == scale_dtype and scale.shape == (2, 3) and torch.equal(scale, ref_scale)
    steps = e4m3_steps(codes, ref_codes)
    # float32 W/s then e4m3 rounds twice; float64 once: they can differ by one step where a tie is decided.
    assert int(steps.max()) <= 1 and float((steps > 0).float().mean()) < 1e-3
    if ue8m0:  # dividing by a power of two is exact, so nothing is left to decide
        assert int(steps.max()) == 0


def test_dequantize_matches_the_reference():
    codes, scale = fp8_reference_quantize(weight_like(), BLOCK)
    assert torch.equal(fp8_block.dequantize(codes, scale, BLOCK), fp8_reference_dequantize(codes, scale, BLOCK))


def test_partial_edge_blocks_have_their_own_scales():
    weight = weight_like()
    _, scale = fp8_block.quantize(weight, BLOCK, torch.float32)
    weight[199, 299] = 1e6  # inside the bottom-right block, 72 x 44
    _, bigger = fp8_block.quantize(weight, BLOCK, torch.float32)
    changed = (bigger != scale).nonzero().tolist()
    assert changed == [[1, 2]] and float(bigger[1, 2]) == pytest.approx(1e6 / 448)


def test_ue8m0_scales_are_powers_of_two_that_do_not_clip():
    weight = weight_like()
    codes, scale = fp8_block.quantize(weight, BLOCK, torch.float32, ue8m0=True)
    mantissa, _ = torch.frexp(scale)
    assert torch.all(mantissa == 0.5)
    assert float(codes.float().abs().max()) <= 448
    amax = torch.stack([weight[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].abs().max()
                        for i in range(2) for j in range(3)]).view(2, 3)
    assert torch.all(scale >= amax / 448) and torch.all(scale < amax / 224)


def test_all_zero_block_gets_the_floor_scale():
    codes, scale = fp8_block.quantize(torch.zeros(128, 256), BLOCK, torch.float32)
    assert torch.equal(scale, torch.full((1, 2), torch.tensor(1e-12 / 448, dtype=torch.float32).item()))
    assert not codes.float().any()


@pytest.mark.parametrize("scale_dtype, scale_fmt", [(torch.float32, "float"), (torch.bfloat16, "float"),
                                                    (torch.float32, "ue8m0")])
def test_round_trip_is_bit_identical(scale_dtype, scale_fmt):
    """Untouched weights survive: requantizing the dequantized weight gives back the reference's own bits."""
    codes, scale = fp8_reference_quantize(weight_like(seed=1), BLOCK, scale_dtype, scale_fmt == "ue8m0")
    weight = described(codes.shape, BLOCK, scale_dtype, scale_fmt)
    again = encode(weight, decode(weight, {"codes": codes, "scale": scale}), {})
    assert torch.equal(again["scale"], scale)
    assert torch.equal(again["codes"].view(torch.uint8), codes.view(torch.uint8))


def test_foreign_scales_survive_when_kept():
    """Scales another quantizer made (any float32, not amax/448) come back only when kept."""
    g = torch.Generator().manual_seed(2)
    codes = (torch.randn(256, 256, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.rand(2, 2, generator=g) + 0.5
    parts = {"codes": codes, "scale": scale}
    weight = described((256, 256))
    kept = encode(weight, decode(weight, parts), parts, keep=True)
    assert torch.equal(kept["scale"], scale) and torch.equal(kept["codes"].view(torch.uint8), codes.view(torch.uint8))
    fresh = encode(weight, decode(weight, parts), parts)
    assert not torch.equal(fresh["scale"], scale)  # the largest code was not 448: amax / 448 is another scale


def test_encode_gives_the_stored_dtypes_and_shapes():
    weight = described((200, 300), scale_dtype=torch.bfloat16)
    parts = encode(weight, weight_like(), {})
    assert parts["codes"].dtype == torch.float8_e4m3fn and parts["codes"].shape == (200, 300)
    assert parts["scale"].dtype == torch.bfloat16 and parts["scale"].shape == (2, 3)
    with pytest.raises(ValueError, match="merged shape"):
        encode(weight, torch.zeros(300, 200), {})
    with pytest.raises(ValueError, match="part scale"):
        decode(weight, {"codes": parts["codes"], "scale": parts["scale"].float()})


# ---------------------------------------------------------------- real checkpoints


def transformers_dequantized(model_cls, path: str) -> dict[str, torch.Tensor]:
    from transformers import FineGrainedFP8Config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_cls.from_pretrained(path, quantization_config=FineGrainedFP8Config(dequantize=True),
                                          dtype=torch.bfloat16)
    return model.state_dict()


def test_llama_checkpoint_decodes_as_transformers_loads_it(tmp_path):
    """Whole blocks: transformers 5.24 derives the block size from the scale grid, so it only dequantizes
    partial edge blocks correctly when they are absent (see the partial-block test below)."""
    from transformers import LlamaForCausalLM

    checkpoint = save_fp8_llama(str(tmp_path / "fp8"), block=(64, 64), hidden_size=128, intermediate_size=192)
    ours = {name: w.to(torch.bfloat16) for name, w in decode_checkpoint(checkpoint.path).items()}
    assert len(ours) == 14
    loaded = transformers_dequantized(LlamaForCausalLM, checkpoint.path)
    assert all(torch.equal(loaded[name], value) for name, value in ours.items())
    assert all(torch.equal(loaded[name], value) for name, value in checkpoint.dequantized.items())
    plain = LlamaForCausalLM.from_pretrained(save_dequantized(checkpoint, str(tmp_path / "bf16")), dtype=torch.bfloat16)
    assert all(torch.equal(plain.state_dict()[name], value) for name, value in checkpoint.dequantized.items())


def test_partial_block_checkpoint_decodes_as_the_reference(tmp_path):
    checkpoint = save_fp8_llama(str(tmp_path / "fp8"), scale_fmt="ue8m0", scale_dtype=torch.bfloat16)
    weights = quantized_weights(checkpoint.path)
    assert weights["model.layers.0.mlp.down_proj.weight"].part("scale").shape == (2, 2)  # 160 x 200 in 128 blocks
    ours = decode_checkpoint(checkpoint.path)
    assert set(ours) == set(checkpoint.exact)
    assert all(torch.equal(ours[name], value) for name, value in checkpoint.exact.items())


def test_deepseek_v3_checkpoint_decodes_as_transformers_loads_it(tmp_path):
    from transformers import DeepseekV3ForCausalLM

    # Whole 16 x 16 blocks everywhere (rope 16 makes kv_a_proj_with_mqa 48 rows): transformers 5.24 refuses a
    # partial block ("not divisible by scale grid"), which real DeepSeek-V3 has (576 rows in 128-row blocks).
    checkpoint = save_fp8_deepseek_v3(str(tmp_path / "fp8"), block=(16, 16), qk_rope_head_dim=16)
    ours = {name: w.to(torch.bfloat16) for name, w in decode_checkpoint(checkpoint.path).items()}
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in ours and "model.layers.1.mlp.gate.weight" not in ours
    loaded = transformers_dequantized(DeepseekV3ForCausalLM, checkpoint.path)
    fused = fuse_experts(ours)  # transformers holds the routed experts as 3-D tensors
    plain = {name: value for name, value in ours.items() if ".experts." not in name}
    assert len(fused) == 2 and len(plain) == 16
    assert all(torch.equal(loaded[name], value) for name, value in (fused | plain).items())



def test_e4m3_codes_read_through_the_table_are_torchs_own_cast_bit_for_bit():
    from merge_core.format.codecs.floats import as_float32
    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).repeat(3, 1)  # NaN and ±0 too
    assert torch.equal(as_float32(every).view(torch.int32), every.float().view(torch.int32))
    assert as_float32(every[:, ::2]).shape == (3, 128), "a strided view is read as it is"
    assert torch.equal(as_float32(every[:, ::2]).view(torch.int32), every[:, ::2].float().view(torch.int32))


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_sampled_rows_alone_decode_step_and_reach_as_in_the_whole_weight(scale_dtype):
    from merge_core.format import codecs
    weight = described((300, 200), scale_dtype=scale_dtype)
    parts = encode(weight, weight_like(300, 200, seed=3), {})
    rows = [299, 0, 128, 127, 5, 128]  # edge blocks, block boundaries, a repeat, any order
    sampled, sampled_parts, at = codecs.rows(weight, parts, rows)
    assert sampled.shape == (len(rows), 200) and at == list(range(len(rows)))
    whole_low, whole_high = codecs.reach(weight, parts)
    low, high = codecs.reach(sampled, sampled_parts)
    for name, whole, alone in (("decode", decode(weight, parts), decode(sampled, sampled_parts)),
                               ("step", codecs.step(weight, parts), codecs.step(sampled, sampled_parts)),
                               ("low", whole_low, low), ("high", whole_high, high)):
        assert torch.equal(alone.view(torch.int32), whole[rows].view(torch.int32)), name
