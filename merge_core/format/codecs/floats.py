"""float32 bit arithmetic the formats' scales share."""

from __future__ import annotations

from merge_core.format.codecs.deferred import torch

EXPONENT_BITS = 0x7F800000
MANTISSA_BITS = 0x007FFFFF


def round_up_to_power_of_two(values: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2 v) for positive normal float32 v (0 stays 0), exactly: adding a mantissa of all ones
    carries into the exponent unless the mantissa was zero (DeepSeek's kernel computes the same with
    exp2(ceil(log2 s)), triton's MX downcast with this bit arithmetic)."""
    bits = values.contiguous().view(torch.int32)
    return ((bits + MANTISSA_BITS) & EXPONENT_BITS).view(torch.float32)
