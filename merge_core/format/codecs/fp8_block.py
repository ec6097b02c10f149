"""FP8 e4m3 with one scale per (bo, bi) block, as DeepSeek-V3 stores it: W ≈ code × weight_scale_inv.

Stored (quant_method "fp8": DeepSeek-V3/R1, Kimi K2-Instruct, MiniMax-M2, Qwen3 -FP8): `X.weight` F8_E4M3
(out, in) beside `X.weight_scale_inv` F32/BF16 (ceil(out/bo), ceil(in/bi)), one scale per
weight_block_size block, edge blocks partial.

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

import dataclasses
from typing import Iterator, Mapping, Sequence

from merge_core.errors import InputError
from merge_core.format.codecs.checks import CORRUPT_FIX, UNQUANTIZED_FIX, module_names, positive_int, refusal
from merge_core.format.codecs.deferred import tensors, torch
from merge_core.format.codecs.floats import as_float32, round_up_to_power_of_two
from merge_core.format.header import TensorInfo
from merge_core.format.quantization import Codec, Method, QuantizedWeight, QuantScheme

E4M3_MAX = 448.0
E4M3_MIN_EXPONENT = -6  # below 2^-6 e4m3 is subnormal, with the spacing of 2^-6's binade
E4M3_MANTISSA_BITS = 3
AMAX_FLOOR = 1e-12  # keeps an all-zero block's scale finite and non-zero
FP8_FORMATS = ("e4m3", "float8_e4m3fn")  # DeepSeek/Qwen write "e4m3", MiniMax "float8_e4m3fn"
SCALE_FORMATS = ("float", "ue8m0")
SCALE_DTYPES = ("F32", "BF16")
SCALE_SUFFIX = "_scale_inv"


# ---------------------------------------------------------------- the tensors


def _row_blocks(scale: torch.Tensor, block: tuple[int, int], rows: int, cols: int
                ) -> Iterator[tuple[slice, torch.Tensor]]:
    """Each row of blocks (up to bo rows) with its scales spread over the columns, float32."""
    bo, bi = block
    for i, start in enumerate(range(0, rows, bo)):
        yield slice(start, start + bo), scale[i].float().repeat_interleave(bi)[:cols]


def dequantize(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 (out, in): each code (float8_e4m3fn) times its block's scale, the product rounded to float32 once."""
    rows, cols = codes.shape
    weight = torch.empty(rows, cols, dtype=torch.float32, device=codes.device)
    for rows_here, row_scale in _row_blocks(scale, block, rows, cols):
        torch.mul(as_float32(codes[rows_here]), row_scale, out=weight[rows_here])
    return weight


def quantize(weight: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype,
             ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes float8_e4m3fn (out, in), scale (ceil(out/bo), ceil(in/bi)) in scale_dtype) for a float32 weight."""
    rows, cols = weight.shape
    bo, bi = block
    scale = torch.empty(ceil_div(rows, bo), ceil_div(cols, bi), dtype=scale_dtype, device=weight.device)
    for i, start in enumerate(range(0, rows, bo)):
        scale[i] = _block_scales(weight[start:start + bo], bi, ue8m0).to(scale_dtype)
    return quantize_codes(weight, scale, block), scale


def quantize_codes(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The e4m3 codes of a float32 weight against given (stored) block scales, saturating at ±448."""
    rows, cols = weight.shape
    codes = torch.empty(rows, cols, dtype=torch.float8_e4m3fn, device=weight.device)
    for rows_here, row_scale in _row_blocks(scale, block, rows, cols):
        scaled = weight[rows_here].float() / row_scale
        codes[rows_here] = scaled.clamp_(-E4M3_MAX, E4M3_MAX)
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


def block_steps(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The spacing of e4m3 values around each code, times its block's scale."""
    exponent = torch.floor(torch.log2(codes.float().abs().clamp(min=2.0 ** E4M3_MIN_EXPONENT)))
    spacing = torch.exp2(exponent - E4M3_MANTISSA_BITS).to(torch.float8_e4m3fn)  # powers of two: exact
    return dequantize(spacing, scale, block)


# ---------------------------------------------------------------- config.json and the headers


def _weight(scheme: QuantScheme, weight: TensorInfo, scale: TensorInfo, where: str) -> QuantizedWeight:
    if len(weight.shape) != 2:
        raise refusal(where, weight.name, f"has shape {list(weight.shape)}; only 2-D FP8 weights are supported",
                      UNQUANTIZED_FIX)
    if scale.dtype not in SCALE_DTYPES:
        raise refusal(where, scale.name, f"is {scale.dtype}; block scales must be one of {', '.join(SCALE_DTYPES)}",
                      UNQUANTIZED_FIX)
    (rows, cols), (bo, bi) = weight.shape, scheme.block
    expected = (ceil_div(rows, bo), ceil_div(cols, bi))
    if scale.shape != expected:
        fit = fitting_block(rows, cols, scale.shape)
        fix = (f"the scales were made with weight_block_size {list(fit)}: set it in config.json's quantization_config"
               if fit else CORRUPT_FIX)
        raise refusal(where, scale.name, f"has shape {list(scale.shape)} but weight_block_size {[bo, bi]} and "
                      f"{weight.name} {list(weight.shape)} make {list(expected)}", fix)
    return QuantizedWeight(weight.name, CODEC.name, (("codes", weight), ("scale", scale)), (rows, cols),
                           block=scheme.block, scale_fmt=scheme.scale_fmt)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def fitting_block(rows: int, cols: int, scale_shape: Sequence[int]) -> tuple[int, int] | None:
    """A weight_block_size that makes this scale shape (square, and the power of two nearest 128, when one
    is), or None when none does."""
    if len(scale_shape) != 2:
        return None
    options = [_block_options(n, blocks) for n, blocks in zip((rows, cols), scale_shape, strict=True)]
    if not all(options):
        return None

    def best(sizes: set[int]) -> int:
        powers = [b for b in sizes if b & (b - 1) == 0]
        return min(powers, key=lambda b: abs(b.bit_length() - 8)) if powers else min(sizes)

    square = options[0] & options[1]
    return (best(square),) * 2 if square else (best(options[0]), best(options[1]))


def _block_options(n: int, blocks: int) -> set[int]:
    """Every block size b with ceil(n / b) == blocks (any b >= n makes one block; 4096 bounds them)."""
    if n <= 0 or blocks <= 0 or blocks > n:
        return set()
    low = ceil_div(n, blocks)
    high = max(n, 4096) if blocks == 1 else (n - 1) // (blocks - 1)
    return set(range(low, high + 1)) if ceil_div(n, low) == blocks else set()


# ---------------------------------------------------------------- the codec


class Fp8Block(Method, Codec):
    name = "fp8_block"
    quant_method = "fp8"

    def read_scheme(self, qc: Mapping, subject: str) -> QuantScheme:
        fmt = qc.get("fmt", "e4m3")
        if fmt not in FP8_FORMATS:
            raise InputError(f"{subject}.fmt", f"FP8 format {fmt!r} is not supported (supported: "
                             f"{', '.join(FP8_FORMATS)})", UNQUANTIZED_FIX)
        scale_fmt = qc.get("scale_fmt") or "float"
        if scale_fmt not in SCALE_FORMATS:
            raise InputError(f"{subject}.scale_fmt", f"scale format {scale_fmt!r} is not supported (supported: "
                             f"{', '.join(SCALE_FORMATS)})", UNQUANTIZED_FIX)
        block = qc.get("weight_block_size")
        if block is None:
            raise InputError(f"{subject}.weight_block_size", "is missing: only block-scaled FP8 is supported, not "
                             "per-tensor scales", UNQUANTIZED_FIX)
        if not (isinstance(block, list) and len(block) == 2 and all(positive_int(b) for b in block)):
            raise InputError(f"{subject}.weight_block_size", f"{block!r} is not two positive integers",
                             "write the block size the scales were made with, e.g. [128, 128]")
        not_converted = module_names(qc, ("modules_to_not_convert", "ignored_layers"), subject)
        return QuantScheme(self.quant_method, block=(block[0], block[1]), scale_fmt=scale_fmt,
                           not_converted=not_converted)

    def group(self, scheme: QuantScheme, infos: Mapping[str, TensorInfo], where: str) -> Iterator[QuantizedWeight]:
        scales = {name[: -len(SCALE_SUFFIX)]: info for name, info in infos.items()
                  if name.endswith(".weight" + SCALE_SUFFIX)}
        for name, info in sorted(infos.items()):
            if info.dtype == "F8_E4M3" and name not in scales:
                raise refusal(where, name, f"is F8_E4M3 but has no {name}{SCALE_SUFFIX} beside it")
        for name, scale in sorted(scales.items()):
            weight = infos.get(name)
            if weight is None or weight.dtype != "F8_E4M3":
                raise refusal(where, scale.name, f"has no F8_E4M3 weight {name} beside it"
                              + ("" if weight is None else f" ({name} is {weight.dtype})"))
            yield _weight(scheme, weight, scale, where)

    def describe(self, scheme: QuantScheme) -> str:
        ue8m0 = ", ue8m0 scales" if scheme.scale_fmt == "ue8m0" else ""
        return f"fp8 e4m3, {scheme.block[0]}×{scheme.block[1]} blocks{ue8m0}"

    def decode(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return dequantize(parts["codes"], parts["scale"], weight.block)

    def encode(self, weight: QuantizedWeight, merged: torch.Tensor,
               given: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        scale = given.get("scale")
        if scale is None:
            scale_dtype = tensors.TORCH_DTYPES[weight.part("scale").dtype]
            codes, scale = quantize(merged, weight.block, scale_dtype, ue8m0=weight.scale_fmt == "ue8m0")
        else:
            codes = quantize_codes(merged, scale, weight.block)
        return {"codes": codes, "scale": scale}

    def step(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return block_steps(parts["codes"], parts["scale"], weight.block)

    def rows(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor], rows: Sequence[int]
             ) -> tuple[QuantizedWeight, dict[str, torch.Tensor]]:
        """The rows with their blocks' scales, as a weight of (1, bi) blocks: each value is the same
        code times the same scale."""
        index = torch.tensor(list(rows), dtype=torch.long, device=parts["codes"].device)
        codes, scale = parts["codes"][index], parts["scale"][index // weight.block[0]]
        infos = dict(weight.parts)
        shaped = {role: dataclasses.replace(infos[role], shape=tuple(t.shape))
                  for role, t in (("codes", codes), ("scale", scale))}
        return (dataclasses.replace(weight, parts=tuple((role, shaped[role]) for role, _ in weight.parts),
                                    shape=tuple(codes.shape), block=(1, weight.block[1])),
                {"codes": codes, "scale": scale})

    def reach(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        top = dequantize(torch.full(weight.shape, E4M3_MAX, device=parts["scale"].device).to(torch.float8_e4m3fn),
                         parts["scale"], weight.block)
        return -top, top


CODEC = Fp8Block()
