"""What the fuse did to one tensor, measured block by block for the report: ‖W‖, ‖ΔW‖, max |ΔW| and
the NaN/Inf W' gained. It only measures: the fuse computes and rounds."""

from __future__ import annotations

import torch

from merge_core.numerics.stats import FuseStats


class Tally:
    def __init__(self, dtype: torch.dtype) -> None:
        self.limit = torch.finfo(dtype).max  # a value past it rounds to Inf in W's dtype
        self.weight_sq = self.delta_sq = self.delta_max = 0.0
        self.introduced = 0

    def weight(self, block: torch.Tensor) -> None:
        """A block of W in float32 (contiguous)."""
        flat = block.reshape(-1)
        self.weight_sq += float(torch.dot(flat, flat))

    def delta(self, delta: torch.Tensor) -> None:
        """A block of ΔW, where the fuse adds ΔW as it is."""
        low, high = torch.aminmax(delta)
        self.delta_max = max(self.delta_max, float(torch.maximum(-low, high)))
        flat = delta.reshape(-1) if delta.is_contiguous() else None
        self.delta_sq += float(torch.dot(flat, flat)) if flat is not None else \
            float(torch.linalg.vector_norm(delta)) ** 2

    def change(self, before: torch.Tensor, after: torch.Tensor) -> None:
        """A block of W and of W' in float32, where ΔW is what the stages made of W (`before` is
        overwritten with W − W')."""
        self.weight_sq += float(torch.linalg.vector_norm(before)) ** 2
        before.sub_(after)
        low, high = torch.aminmax(before)
        self.delta_max = max(self.delta_max, float(torch.maximum(-low, high)))
        self.delta_sq += float(torch.linalg.vector_norm(before)) ** 2

    def nonfinite_before(self, exact: torch.Tensor, stored: torch.Tensor) -> int | None:
        """Before W' is rounded into `stored`: None when every value of `exact` is finite and within W's
        dtype, else how many NaN/Inf `stored` holds already."""
        low, high = torch.aminmax(exact)
        if bool(torch.maximum(-low, high) <= self.limit):
            return None
        return int((~stored.isfinite()).sum())

    def nonfinite_after(self, stored: torch.Tensor, already: int | None) -> None:
        if already is not None:
            self.introduced += int((~stored.isfinite()).sum()) - already

    def stats(self) -> FuseStats:
        return FuseStats(delta_norm=self.delta_sq ** 0.5, delta_max=self.delta_max, weight_norm=self.weight_sq ** 0.5,
                         nonfinite_introduced=max(self.introduced, 0))
