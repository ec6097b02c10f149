"""What a fuse measured of one tensor, for the report. Free of torch: the driver reads it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class FuseStats:
    """What one fuse did to one tensor, for the report: ‖ΔW‖, max |ΔW|, ‖W‖ (float32 ΔW, before rounding)."""
    delta_norm: float
    delta_max: float
    weight_norm: float
    nonfinite_introduced: int  # NaN/Inf elements in W' beyond those already in W
    # A quantized weight, stored again in its format (or as bf16): ‖deq(Q(W')) − W'‖ / ‖ΔW‖, and the
    # share of the adapter's update the stored weight kept, cos(deq(Q(W')) − deq(W), ΔW). None when
    # the weight is not quantized, or no adapter changed it.
    requant_error: float | None = None
    adapter_kept: float | None = None
    # With several updates: each one's ‖ΔW‖ (weighted; for DoRA, IA3 and copies, the change it made)
    adapter_norms: tuple[float, ...] = ()
    # An unmerge compared with the original base: elements that came back bit for bit, and the
    # largest distance of the others in units of the last place. None when not compared.
    recovered_equal: int | None = None
    recovered_max_ulps: int | None = None
    # Fresh scales of fused siblings whose base shares one tensor-level scale: the siblings that share
    # the new one with this weight (merge_core.worker.quantized_tensor)
    tied_with: tuple[str, ...] = ()
