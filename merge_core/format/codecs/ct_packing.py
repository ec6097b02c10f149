"""How compressed-tensors packs codes that are narrower than their storage.

`pack_to_int32` (compressors/pack_quantized/helpers.py): integer codes of b bits (1 to 8), offset by
2^(b-1) to be unsigned, laid end to end with no padding bits, element i at bits i·b onward of each run
of 32 elements, so that one run fills exactly b words (a code may straddle two); rows end on a word
(a partial run is padded with zeros). Zero points are packed the same way down the rows (packed_dim=0).

`pack_fp4_to_uint8` (compressors/nvfp4/helpers.py): two e2m1 codes a byte, the even element in the
low nibble; a code is its sign bit (8) and the index of its magnitude among 0, 0.5, 1, 1.5, 2, 3, 4, 6.
"""

from __future__ import annotations

from merge_core.format.codecs.deferred import torch

RUN = 32  # elements per run of b words
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
WORD = 1 << 32


def packed_columns(columns: int, bits: int) -> int:
    return -(-columns * bits // 32)


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int codes (rows, columns), each in [-2^(b-1), 2^(b-1)) → int32 (rows, ceil(columns·b/32))."""
    rows, columns = codes.shape
    values = (codes.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    values = torch.nn.functional.pad(values, (0, -columns % RUN)).view(rows, -1, RUN)
    words = torch.zeros(rows, values.shape[1], bits, dtype=torch.int64, device=codes.device)
    for i in range(RUN):  # element i's bits land in word i·b // 32 and, past its end, in the next one
        start = i * bits
        word, offset = divmod(start, 32)
        words[:, :, word] |= (values[:, :, i] << offset) & (WORD - 1)
        if offset + bits > 32:
            words[:, :, word + 1] |= values[:, :, i] >> (32 - offset)
    words = words.view(rows, -1)[:, :packed_columns(columns, bits)]
    return torch.where(words >= WORD // 2, words - WORD, words).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """int32 (rows, ceil(columns·b/32)) → int8 codes (rows, columns)."""
    rows, count = packed.shape
    words = packed.to(torch.int64) & (WORD - 1)
    words = torch.nn.functional.pad(words, (0, -count % bits)).view(rows, -1, bits)
    codes = torch.empty(rows, words.shape[1], RUN, dtype=torch.int64, device=packed.device)
    for i in range(RUN):
        word, offset = divmod(i * bits, 32)
        value = words[:, :, word] >> offset
        if offset + bits > 32:
            value = value | (words[:, :, word + 1] << (32 - offset))
        codes[:, :, i] = value & ((1 << bits) - 1)
    return (codes.view(rows, -1)[:, :columns] - (1 << (bits - 1))).to(torch.int8)


def pack_rows_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points (rows, groups) packed down the rows: (ceil(rows·b/32), groups)."""
    packed = pack_int32(codes.t().contiguous(), bits).t()
    return packed.contiguous().reshape(-1).reshape(packed.shape)  # strides of a fresh tensor, even (n, 1)


def unpack_rows_int32(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    codes = unpack_int32(packed.t().contiguous(), bits, rows).t()
    return codes.contiguous().reshape(-1).reshape(codes.shape)


def pack_e2m1(values: torch.Tensor) -> torch.Tensor:
    """e2m1 values (rows, columns), each one of ±E2M1_MAGNITUDES → uint8 (rows, columns / 2). The sign
    bit is the value's sign bit, so -0.0 is stored as code 8."""
    magnitudes = torch.tensor(E2M1_MAGNITUDES, device=values.device)
    index = torch.bucketize(values.abs(), magnitudes).to(torch.uint8)
    codes = index | (torch.signbit(values).to(torch.uint8) << 3)
    pairs = codes.view(*codes.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (rows, columns / 2) → float32 e2m1 values (rows, columns), the low nibble first."""
    lut = torch.tensor(E2M1_MAGNITUDES + tuple(-m for m in E2M1_MAGNITUDES), device=packed.device)
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)
    return lut[codes.long()]
