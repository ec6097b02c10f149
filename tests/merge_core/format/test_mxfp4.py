"""MXFP4 codec: decoding against transformers' convert_moe_packed_tensors, encoding against a brute-force nearest
e2m1 search, ties by a hand-written table, and a real GPT-OSS checkpoint as transformers loads it."""

from __future__ import annotations

import warnings

import pytest
import torch

from merge_core.format.codecs import decode, encode, mxfp4
from merge_core.format.header import TensorInfo
from merge_core.format.quantization import QuantizedWeight
from tests.quantized_models import decode_checkpoint, mxfp4_reference_quantize, quantized_weights, save_mxfp4_gpt_oss


def described(experts: int, columns: int, rows: int) -> QuantizedWeight:
    groups = columns // 32
    blocks = TensorInfo(name="e.gate_up_proj_blocks", dtype="U8", shape=(experts, rows, groups, 16), start=0, end=0)
    scales = TensorInfo(name="e.gate_up_proj_scales", dtype="U8", shape=(experts, rows, groups), start=0, end=0)
    return QuantizedWeight("e.gate_up_proj", "mxfp4", (("blocks", blocks), ("scales", scales)),
                           (experts, columns, rows), group_size=32)


def random_parts(experts=3, rows=24, groups=4, low=0, high=255, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, rows, groups, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(low, high, (experts, rows, groups), generator=g, dtype=torch.uint8)
    return blocks, scales


def test_decode_is_transformers_convert_moe_packed_tensors():
    """Every E8M0 byte but 255 (NaN in the format; 0 x 2^128 is NaN in both): bit for bit in float32, and
    in transformers' default bf16, which holds every finite e2m1 x 2^k exactly (2 significant bits, same
    exponent range as float32), so rounding our float32 to bf16 changes nothing."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = random_parts(low=0, high=255)
    scales[0, 0, :4] = torch.tensor([0, 1, 253, 254], dtype=torch.uint8)
    ours = mxfp4.dequantize(blocks, scales)
    assert ours.shape == (3, 128, 24) and ours.dtype == torch.float32
    assert torch.equal(ours, convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=torch.float32))
    assert torch.equal(ours.to(torch.bfloat16), convert_moe_packed_tensors(blocks.clone(), scales.clone()))
    assert torch.isinf(ours).any()  # 3 x 2^127 and up overflow, in transformers too


def logical_weight(experts=3, columns=128, rows=24, seed=0) -> torch.Tensor:
    """Groups of very different magnitudes, zeros, negative zeros, exact e2m1 values and exact ties."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(experts, columns, rows, generator=g) * torch.logspace(-30, 30, rows)
    weight[0, :32, 0] = 0.0
    weight[0, :32, 1] = -0.0
    weight[1, :32, 2] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] * 4)  # scale 1: exact ties
    weight[1, 32:64, 2] = -weight[1, :32, 2]
    weight[2, :32, 3] = torch.tensor([0.5, 1.0, 1.5, 3.0] * 8) * 2.0 ** -20  # largest 3: scale 2^-21
    return weight


@pytest.mark.parametrize("ties", ["even", "away"])
def test_encode_matches_the_brute_force_reference(ties):
    weight = logical_weight()
    blocks, scales = mxfp4.quantize(weight, ties)
    ref_blocks, ref_scales = mxfp4_reference_quantize(weight, ties)
    assert blocks.shape == (3, 24, 4, 16) and scales.shape == (3, 24, 4)
    assert torch.equal(scales, ref_scales)
    assert torch.equal(blocks, ref_blocks)


def codes_of(values: list[float], ties: str) -> list[float]:
    """Values of a group whose largest magnitude is 6 (scale 2^0), after quantization."""
    weight = torch.zeros(1, 32, 1)
    weight[0, :len(values), 0] = torch.tensor(values)
    blocks, scales = mxfp4.quantize(weight, ties)
    assert scales.item() == 127
    return mxfp4.dequantize(blocks, scales)[0, :len(values), 0].tolist()


def test_ties():
    ties = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0]
    assert codes_of(ties, "even") == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -4.0]
    assert codes_of(ties, "away") == [6.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.5, -6.0]
    # 0.25 + 2^-25 differs from the tie only in the bit that subnormal shifting drops first
    near = [6.0, 0.25 + 2.0 ** -25, 0.2500001, 0.7499999, 2.4999998, 5.0000005, 0.1]
    assert codes_of(near, "even") == codes_of(near, "away") == [6.0, 0.5, 0.5, 0.5, 2.0, 6.0, 0.0]
    with pytest.raises(ValueError, match="ties"):
        mxfp4.e2m1_codes(torch.zeros(2), "up")


def test_scale_rounds_up_so_nothing_clips():
    weight = torch.zeros(1, 32, 3)
    weight[0, 0] = torch.tensor([6.0, 6.000001, 3.0])  # amax / 6 just above 1 rounds up to 2; exactly 0.5 stays
    _, scales = mxfp4.quantize(weight)
    assert scales.view(-1).tolist() == [127, 128, 126]


def canonical_parts(seed=0):
    """Blocks and scales as the reference quantizer makes them: each group's largest code is ±4 or ±6."""
    blocks, scales = random_parts(low=100, high=150, seed=seed)
    blocks[..., 0] = (blocks[..., 0] & 0xF0) | 0x7  # code 7: 6.0 somewhere in every group
    blocks[0, 0, 0] = 0x66  # a group whose largest code is 4 (code 6), both nibbles
    blocks[0, 0, 0, 1:] = 0x11
    return blocks, scales


def test_round_trip_of_canonical_groups_is_bit_identical():
    blocks, scales = canonical_parts()
    weight = described(3, 128, 24)
    again = encode(weight, decode(weight, {"blocks": blocks, "scales": scales}), {})
    assert torch.equal(again["blocks"], blocks) and torch.equal(again["scales"], scales)


def test_non_canonical_groups_keep_their_values_not_their_bits():
    """A group whose largest code is 3 (or less) gets the scale amax / 6 rounds up to, a smaller one, and
    doubled codes: the same values. Keeping the scales keeps the stored bits instead."""
    blocks, scales = canonical_parts()
    blocks[1, 2, 3] = 0x35  # codes 5 and 3: 3.0 and 1.5, largest 3
    blocks[2, 0, 1] = 0  # all zeros, scale still 120-ish
    weight = described(3, 128, 24)
    parts = {"blocks": blocks, "scales": scales}
    values = decode(weight, parts)
    again = encode(weight, values, {})
    assert torch.equal(decode(weight, again), values)
    assert again["scales"][1, 2, 3] == scales[1, 2, 3] - 1 and again["blocks"][1, 2, 3, 0] == 0x57
    assert again["scales"][2, 0, 1] == 0 and not again["blocks"][2, 0, 1].any()
    differing = (again["scales"] != scales).nonzero().tolist()
    assert differing == [[1, 2, 3], [2, 0, 1]]
    kept = encode(weight, values, parts, keep=True)
    assert torch.equal(kept["blocks"], blocks) and torch.equal(kept["scales"], scales)


def test_quantize_codes_saturates_against_kept_scales():
    blocks, scales = canonical_parts()
    weight = described(3, 128, 24)
    values = decode(weight, {"blocks": blocks, "scales": scales})
    values[0, 0, 0] *= 100  # far past its group's range
    kept = encode(weight, values, {"blocks": blocks, "scales": scales}, keep=True)
    assert decode(weight, kept)[0, 0, 0].abs() == 6 * 2.0 ** (int(scales[0, 0, 0]) - 127)


def test_gpt_oss_checkpoint_decodes_as_transformers_loads_it(tmp_path):
    from transformers import GptOssForCausalLM, Mxfp4Config

    checkpoint = save_mxfp4_gpt_oss(str(tmp_path / "mxfp4"))
    weights = quantized_weights(checkpoint.path)
    assert {name: w.shape for name, w in weights.items()} == {
        f"model.layers.{i}.mlp.experts.{proj}": shape for i in (0, 1)
        for proj, shape in (("gate_up_proj", (4, 64, 64)), ("down_proj", (4, 32, 64)))}
    ours = decode_checkpoint(checkpoint.path)
    assert all(torch.equal(ours[name], value) for name, value in checkpoint.exact.items())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GptOssForCausalLM.from_pretrained(checkpoint.path, quantization_config=Mxfp4Config(dequantize=True),
                                                  dtype=torch.bfloat16)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[name], value.to(torch.bfloat16)) for name, value in ours.items())
    assert all(torch.equal(loaded[name], value) for name, value in checkpoint.dequantized.items())

