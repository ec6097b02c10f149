"""What a fuse measured of one tensor, for the report. Free of torch: the driver reads it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FuseStats:
    """What one fuse did to one tensor, for the report: ‖ΔW‖, max |ΔW|, ‖W‖ (float32 ΔW, before rounding)."""
    delta_norm: float
    delta_max: float
    weight_norm: float
    nonfinite_introduced: int  # NaN/Inf elements in W' beyond those already in W
