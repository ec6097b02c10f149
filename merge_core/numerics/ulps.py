"""How far apart two float tensors are, in units in the last place of their dtype."""

from __future__ import annotations

import torch

_SIGNED = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of their (shared) float dtype lie between a and b."""
    width = a.element_size()
    va, vb = (t.contiguous().view(_SIGNED[width]).to(torch.int64) for t in (a, b))
    magnitude = (1 << (8 * width - 1)) - 1
    # Floats are sign-magnitude: map them onto a line where adjacent values differ by one.
    oa, ob = (torch.where(v < 0, -(v & magnitude), v) for v in (va, vb))
    return (oa - ob).abs()


def describe_difference(name: str, stored: torch.Tensor, expected: torch.Tensor, max_ulps: int = 0) -> str | None:
    """None when bit-identical (or, with max_ulps, no element further apart), else how far apart they are."""
    s, e = stored.reshape(-1), expected.reshape(-1)
    if torch.equal(s.view(torch.uint8), e.view(torch.uint8)) if s.numel() else True:
        return None
    if not s.is_floating_point():
        return f"tensor {name}: {int((s != e).sum())} of {s.numel()} elements differ"
    ulps = ulp_distance(s, e)
    if max_ulps and int(ulps.max()) <= max_ulps:
        return None
    differing = int((ulps > 0).sum())
    abs_diff = (s.double() - e.double()).abs().nan_to_num(float("inf")).max().item()
    return (f"tensor {name}: {differing} of {s.numel()} elements differ, max {int(ulps.max())} ulp, "
            f"max |difference| {abs_diff:.3g}")
