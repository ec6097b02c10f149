"""compressed-tensors' quantization arithmetic, element for element as the library computes it
(compressed_tensors 0.20: quantization/utils/helpers.py `calculate_qparams`, `generate_gparam`;
quantization/utils/mxfp_utils.py `generate_mx_scales`; quantization/lifecycle/forward_helpers.py
`_quantize`, `_dequantize`; quantization/quant_args.py `round_to_quantized_type_args`), on float32.

A strategy says which elements share a scale: one for the tensor, one per row (channel), one per run
of group_size columns (group, tensor_group, or the columns a `weight_g_idx` assigns to each group),
one per block. `Grid` spreads scale-shaped values over the weight and reduces the weight to them; the
rest is per element, so the library's own reshapes (groups unflattened, blocks transposed) give the
same values:

    q = round(clamp(x / (s / g) + z, qmin, qmax))     quantize (g: NVFP4's global scale, a divisor)
    x = (q − z) · (s / g)                              dequantize

Fresh scales come from the minimum and maximum each scale covers (a min/max observer's): symmetric
s = max(|min|, |max|) / ((qmax − qmin) / 2); asymmetric s = (max − min) / (qmax − qmin) and
z = round(clamp(qmin − min / s, qmin, qmax)); MX formats a power of two, E8M0; a zero scale becomes the
scale dtype's eps.
"""

from __future__ import annotations

from dataclasses import dataclass

from merge_core.format.codecs.deferred import torch
from merge_core.format.quantization import QuantArgs

E4M3_MAX = 448.0
E2M1_MAX = 6.0
GPARAM_NUMERATOR = E4M3_MAX * E2M1_MAX  # generate_gparam: FP8_E4M3_DATA.max * FP4_E2M1_DATA.max
MX_OFFSET = {4: 2, 8: 8}  # floor(log2(the element type's max)): e2m1's 6, e4m3's 448
E8M0_BIAS = 127
FLOAT32_EPS = 2.0 ** -23
E4M3_EPS = 0.125  # compressed-tensors' _get_dtype_eps for float8_e4m3fn scales
# e2m1 rounding as cast_to_fp4 writes it: (bound, value, bound inclusive), largest first; ties go to
# the even code (0.25 → 0, 0.75 → 1, 1.25 → 1, 1.75 → 2, 2.5 → 2, 3.5 → 4, 5 → 4)
E2M1_STEPS = ((5.0, 6.0, False), (3.5, 4.0, True), (2.5, 3.0, False), (1.75, 2.0, True), (1.25, 1.5, False),
              (0.75, 1.0, True), (0.25, 0.5, False))


def code_range(args: QuantArgs) -> tuple[float, float]:
    """(qmin, qmax) of the codes: calculate_range."""
    if args.type == "int":
        return -(2.0 ** (args.num_bits - 1)), 2.0 ** (args.num_bits - 1) - 1
    top = E4M3_MAX if args.num_bits == 8 else E2M1_MAX
    return -top, top


def is_mx(args: QuantArgs) -> bool:
    """should_generate_mx_scales: float, 4 or 8 bits, groups of 32, uint8 scales."""
    return (args.type == "float" and args.num_bits in MX_OFFSET and args.group_size == 32
            and args.scale_dtype == "uint8")


@dataclass(frozen=True)
class Grid:
    """Which scale each element of a (rows, columns) weight uses."""

    args: QuantArgs
    rows: int
    columns: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The scales' shape, as initialize_qparams makes it."""
        strategy, rows, columns = self.args.strategy, self.rows, self.columns
        if strategy == "tensor":
            return (1,)
        if strategy == "channel":
            return (rows, 1)
        if strategy in ("group", "tensor_group"):
            return (rows, -(-columns // self.args.group_size))
        bh, bw = self.args.block
        return (-(-rows // bh), -(-columns // bw))

    def spread(self, values: torch.Tensor, g_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Scale-shaped values (float32) over the weight's elements."""
        values = values.float()
        strategy = self.args.strategy
        if strategy in ("tensor", "channel"):
            return values.reshape(self.shape).expand(self.rows, self.columns)
        if strategy in ("group", "tensor_group"):
            if g_idx is not None:
                return values[:, g_idx.long()]
            return values.repeat_interleave(self.args.group_size, dim=1)[:, :self.columns]
        bh, bw = self.args.block
        return values.repeat_interleave(bh, dim=0).repeat_interleave(bw, dim=1)[:self.rows, :self.columns]

    def bounds(self, weight: torch.Tensor, g_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(min, max) of the elements each scale covers, scale-shaped (zeros pad a partial block or group,
        which changes nothing: calculate_qparams takes min(min, 0) and max(max, 0))."""
        strategy, w = self.args.strategy, weight.float()
        if strategy == "tensor":
            return w.amin().reshape(1), w.amax().reshape(1)
        if strategy == "channel":
            return w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        if strategy in ("group", "tensor_group") and g_idx is not None:
            index = g_idx.long().expand(self.rows, -1)
            low = torch.zeros(self.shape, device=w.device).scatter_reduce(1, index, w, "amin", include_self=True)
            high = torch.zeros(self.shape, device=w.device).scatter_reduce(1, index, w, "amax", include_self=True)
            return low, high
        if strategy in ("group", "tensor_group"):
            size = self.args.group_size
            w = torch.nn.functional.pad(w, (0, -self.columns % size)).unflatten(1, (-1, size))
            return w.amin(dim=-1), w.amax(dim=-1)
        bh, bw = self.args.block
        w = torch.nn.functional.pad(w, (0, -self.columns % bw, 0, -self.rows % bh))
        w = w.unflatten(0, (-1, bh)).unflatten(2, (-1, bw))
        return w.amin(dim=(1, 3)), w.amax(dim=(1, 3))


def generate_gparam(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """NVFP4's global scale (F32 [1]) for values spanning [low, high]: 448 · 6 / amax."""
    amax = torch.maximum(low.float().clamp(max=0).abs(), high.float().clamp(min=0)).amax().reshape(1)
    amax = amax.clamp(min=torch.finfo(torch.float32).tiny)
    return torch.nan_to_num(GPARAM_NUMERATOR / amax, nan=1.0, posinf=1.0, neginf=1.0)


def round_to_power_of_two(values: torch.Tensor) -> torch.Tensor:
    """round_to_power_2 with e2m1's one mantissa bit, in float32: the exponent, raised by one where the
    mantissa reaches 0.75 (adding 2^21 carries into the exponent)."""
    bits = values.float().contiguous().view(torch.int32)
    return ((bits + (1 << 21)) & 0x7F800000).view(torch.float32)


def mx_exponent(amax: torch.Tensor, num_bits: int) -> torch.Tensor:
    """The E8M0 byte of an MX scale (as float, 0..255): generate_mx_scales, then the uint8 scale dtype's
    round and clamp (a zero amax gives log2(0) = -inf, clamped to byte 0)."""
    exponent = E8M0_BIAS + torch.floor(torch.log2(round_to_power_of_two(amax))) - MX_OFFSET[num_bits]
    return torch.round(exponent.clamp(0, 255))


def mx_scale(exponent: torch.Tensor) -> torch.Tensor:
    """float32 2^(e − 127) of E8M0 bytes (byte 0 is 2^-127, a float32 subnormal)."""
    return torch.exp2(exponent.float() - E8M0_BIAS)


def calculate_qparams(low: torch.Tensor, high: torch.Tensor, args: QuantArgs,
                      global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) in float32 from each scale's min and max, as calculate_qparams computes
    them. MX scales come back as 2^(e − 127); a scale dtype set in the args rounds the scales to it."""
    low = torch.minimum(low.float(), torch.zeros_like(low, dtype=torch.float32))
    high = torch.maximum(high.float(), torch.zeros_like(high, dtype=torch.float32))
    qmin, qmax = (torch.tensor(v, device=low.device) for v in code_range(args))
    if args.symmetric:
        amax = torch.maximum(low.abs(), high.abs())
        if is_mx(args):
            scale = mx_scale(mx_exponent(amax, args.num_bits))
        else:
            scale = amax / ((qmax - qmin) / 2)
        zero = torch.zeros_like(scale)
    else:
        scale = (high - low) / (qmax - qmin)
        zero = torch.clamp(qmin - low / scale, qmin, qmax)
    if global_scale is not None:
        scale = global_scale.float() * scale
    if args.scale_dtype not in (None, "uint8"):  # MX exponents were rounded to uint8 above
        dtype = getattr(torch, args.scale_dtype)
        scale = scale.clamp(torch.finfo(dtype).min, torch.finfo(dtype).max).to(dtype).float()
    eps = {None: FLOAT32_EPS, "uint8": 1.0, "float8_e4m3fn": E4M3_EPS}.get(args.scale_dtype)
    eps = torch.finfo(getattr(torch, args.scale_dtype)).eps if eps is None else eps
    scale = torch.where(scale == 0, torch.tensor(eps, device=scale.device), scale)
    # zp_dtype int8 (float formats are symmetric): NaN (an all-zero group's 0 / 0) becomes 0, as in the library
    return scale, torch.round(zero.clamp(-128, 127)).to(torch.int8).float()


def round_codes(scaled: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """round_to_quantized_type_args: clamp to the codes' range, then round to the nearest code (ties to
    even): int, e4m3 (torch's cast), e2m1 (cast_to_fp4). float32 values of the codes."""
    qmin, qmax = code_range(args)
    clamped = scaled.clamp(qmin, qmax)
    if args.type == "int":
        return clamped.round_()
    if args.num_bits == 8:
        return clamped.to(torch.float8_e4m3fn).float()
    return round_e2m1(clamped)


def round_e2m1(values: torch.Tensor) -> torch.Tensor:
    """cast_to_fp4: the nearest e2m1 value; negative values keep their sign even when they round to
    zero (-0.0), while -0.0 itself becomes +0.0, as torch.sign(x) * |x| rounded makes it."""
    magnitude = values.abs()
    rounded = torch.zeros_like(magnitude)
    done = torch.zeros_like(magnitude, dtype=torch.bool)
    for bound, value, inclusive in E2M1_STEPS:
        hit = ~done & ((magnitude >= bound) if inclusive else (magnitude > bound))
        rounded = torch.where(hit, value, rounded)
        done |= hit
    return torch.where(values < 0, -rounded, rounded)


def quantize(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, args: QuantArgs) -> torch.Tensor:
    """float32 code values of a float32 weight, scale (and zero point) spread over its elements:
    _quantize's x / scale (+ zero point), clamped and rounded."""
    scaled = weight.float() / scale
    if zero is not None:
        scaled += zero
    return round_codes(scaled, args)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """float32 (code − zero point) · scale, spread over the elements: _dequantize before its cast to the
    scale dtype (exact, except where the scale itself is a quotient: NVFP4's s / g)."""
    values = codes.float()
    if zero is not None:
        values = values - zero
    return values * scale


def spacing(codes: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """How far each code is from the next one up in magnitude: 1 for integers, the e4m3 or e2m1
    spacing of the code's binade for floats."""
    if args.type == "int":
        return torch.ones_like(codes, dtype=torch.float32)
    magnitude = codes.float().abs()
    if args.num_bits == 8:
        return torch.exp2(torch.floor(torch.log2(magnitude.clamp(min=2.0 ** -6))) - 3)
    return torch.where(magnitude < 2, 0.5, torch.where(magnitude < 4, 1.0, 2.0))
