"""FP8 e4m3 with one scale per (bo, bi) block, as DeepSeek-V3 stores it: W ≈ code × weight_scale_inv.

Requantization follows DeepSeek's weight quantizer (deepseek-ai/DeepSeek-V3, inference/kernel.py
`weight_quant_kernel`, which its bf16_cast_fp8.py uses), per block in float32: s = amax|W'| / 448, code =
e4m3(W' / s), rounded to nearest even. Two additions: amax is floored at 1e-12, since an all-zero block would
make 0 / 0 there; and with scale_fmt "ue8m0" s becomes 2^ceil(log2 s), as DeepSeek-V3.1's kernels round their
scales. The clamp to ±448 is what Triton's saturating cast does there; written out, it does not depend on how
each device's torch cast treats values out of range.

The scale is stored in the base's dtype. A BF16 scale rounds s first and the codes are computed with the
stored value: dequantization multiplies by what is stored, so dividing by anything else would put every
code of the block off by the rounding ratio. A stored scale that rounded down can push the block's largest
value to 448.x, which saturates at 448 (at most 2^-9 of it lost, less than half an e4m3 step).

The work goes one row of blocks at a time, so a weight needs its own float32 copy plus a few (bo, in)
temporaries, never several full-size ones.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
AMAX_FLOOR = 1e-12  # keeps an all-zero block's scale finite and non-zero
_EXPONENT_BITS = 0x7F800000
_ROUND_UP_MANTISSA = 0x007FFFFF


def dequantize(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 (out, in): each code (float8_e4m3fn) times its block's scale, the product rounded to float32 once."""
    rows, cols = codes.shape
    bo, bi = block
    weight = torch.empty(rows, cols, dtype=torch.float32, device=codes.device)
    for i, start in enumerate(range(0, rows, bo)):
        row_scale = scale[i].float().repeat_interleave(bi)[:cols]
        torch.mul(codes[start:start + bo].float(), row_scale, out=weight[start:start + bo])
    return weight


def quantize(weight: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype,
             ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes float8_e4m3fn (out, in), scale (ceil(out/bo), ceil(in/bi)) in scale_dtype) for a float32 weight."""
    rows, cols = weight.shape
    bo, bi = block
    scale = torch.empty(-(-rows // bo), -(-cols // bi), dtype=scale_dtype, device=weight.device)
    for i, start in enumerate(range(0, rows, bo)):
        scale[i] = _block_scales(weight[start:start + bo], bi, ue8m0).to(scale_dtype)
    return quantize_codes(weight, scale, block), scale


def quantize_codes(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The e4m3 codes of a float32 weight against given (stored) block scales, saturating at ±448."""
    rows, cols = weight.shape
    bo, bi = block
    codes = torch.empty(rows, cols, dtype=torch.float8_e4m3fn, device=weight.device)
    for i, start in enumerate(range(0, rows, bo)):
        row_scale = scale[i].float().repeat_interleave(bi)[:cols]
        scaled = weight[start:start + bo].float() / row_scale
        codes[start:start + bo] = scaled.clamp_(-E4M3_MAX, E4M3_MAX)
    return codes


def _block_scales(rows: torch.Tensor, bi: int, ue8m0: bool) -> torch.Tensor:
    """float32 scales of one row of blocks (up to bo rows): amax / 448, a partial last block padded with zeros."""
    magnitude = rows.float().abs()
    pad = -magnitude.shape[1] % bi
    if pad:
        magnitude = torch.nn.functional.pad(magnitude, (0, pad))
    amax = magnitude.view(magnitude.shape[0], -1, bi).amax(dim=(0, 2))
    scales = amax.clamp_(min=AMAX_FLOOR) / E4M3_MAX
    return round_up_to_power_of_two(scales) if ue8m0 else scales


def round_up_to_power_of_two(values: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2 v) for positive normal float32 v, exactly: adding a mantissa of all ones carries into the
    exponent unless the mantissa was zero (DeepSeek's kernel computes the same with exp2(ceil(log2 s)))."""
    bits = values.contiguous().view(torch.int32)
    return ((bits + _ROUND_UP_MANTISSA) & _EXPONENT_BITS).view(torch.float32)
