"""How the adapters' updates are put together: one value, made from the options and read by the
plan, the shard tasks, the fuse, the spot check and the manifest.

Free of torch: the driver builds and checks it, and never loads torch.

    Arithmetic()                                  W + Σ wᵢ·ΔWᵢ, rounded once
    Arithmetic(sequential=True)                   one adapter after another, rounding after each (PEFT)
    Arithmetic(combine=Combination("ties", 0.3))  the adapters' full deltas combined into one ΔW
    Arithmetic(unmerge=True)                      the updates taken back out, the last adapter first
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from merge_core.errors import InputError

COMBINE_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
MAJORITY_SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class Combination:
    """--combine: how the adapters' full deltas of a tensor become one (merge_core.numerics.combine)."""
    method: str
    density: float
    seed: int = 0
    majority_sign_method: str = "total"  # "total" or "frequency", as in PEFT's ties


def check_combine(combination: Combination) -> None:
    """Raise InputError for a method, density, seed or sign method the combination cannot use."""
    if combination.method not in COMBINE_METHODS:
        raise InputError("--combine", f"unknown method {combination.method!r}",
                         f"use one of {', '.join(COMBINE_METHODS)}")
    density = combination.density
    if isinstance(density, bool) or not isinstance(density, (int, float)) \
            or not math.isfinite(density) or not 0.0 < density <= 1.0:
        raise InputError("--density", f"{density!r} is not in (0, 1]",
                         "pass the fraction of each delta to keep, e.g. --density 0.5")
    if isinstance(combination.seed, bool) or not isinstance(combination.seed, int):
        raise InputError("--seed", f"{combination.seed!r} is not an integer", "pass an integer seed, e.g. --seed 0")
    if combination.majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise InputError("majority sign method", f"unknown method {combination.majority_sign_method!r}",
                         f"use one of {', '.join(MAJORITY_SIGN_METHODS)}")


@dataclass(frozen=True)
class Arithmetic:
    sequential: bool = False  # several adapters: round after each, in order (PEFT's merge_and_unload)
    combine: Combination | None = None  # TIES/DARE/magnitude pruning of the adapters' deltas
    unmerge: bool = False  # take the updates back out, as PEFT's unmerge_adapter() does

    def check(self) -> None:
        """Raise InputError where the flags contradict each other."""
        if self.combine is None:
            return
        check_combine(self.combine)
        if self.sequential:
            raise InputError("--sequential", "cannot be combined with --combine, which merges the deltas into one",
                             "pass one of them")
        if self.unmerge:
            raise InputError("--combine", "cannot be undone: the pruned deltas depend on every adapter merged with "
                             "them", "unmerge without --combine")

    @property
    def rounds_each(self) -> bool:
        """Whether each adapter's update is rounded on its own (not the sum once)."""
        return self.unmerge or (self.sequential and self.combine is None)

    def as_json(self) -> dict:
        """What the manifest records, and the resume journal's fingerprint includes."""
        if self.unmerge:
            return {"operation": "unmerge", "rounding": "after each adapter, the last one first", "combine": None}
        return {"rounding": "after each adapter" if self.sequential else "once",
                "combine": None if self.combine is None else dataclasses.asdict(self.combine)}
