"""Which base tensor shapes an update fits, told from its factors' shapes: one rule per kind."""

from __future__ import annotations

import math
from typing import Callable

from merge_core.inputs.adapter import ModuleUpdate
from merge_core.kinds import Kind


def _low_rank(update: ModuleUpdate) -> tuple[int, ...]:
    """B·A: (out, in), stored in×out where transposed; a convolution's kernel dims follow."""
    a, b = update.factor("A"), update.factor("B")
    if len(a.shape) > 2:
        return (b.shape[0], a.shape[1], *a.shape[2:])
    shape = (b.shape[0], a.shape[1])
    return shape[::-1] if update.transpose else shape


def _parameter(update: ModuleUpdate) -> tuple[int, ...]:
    """A 2-D parameter (or one expert's tensor), or E experts (E, out, in), (E, in, out) transposed."""
    a, b = update.factor("A"), update.factor("B")
    if update.experts.two_d:
        return (b.shape[0], a.shape[1])
    return (update.experts.count, *((a.shape[1], b.shape[0]) if update.transpose else (b.shape[0], a.shape[1])))


def _whole(update: ModuleUpdate) -> tuple[int, ...]:
    """A bias vector, or a whole replacement tensor: the factor's own shape."""
    return tuple(update.factors[0].shape)


def _vector(update: ModuleUpdate, shape: tuple[int, ...]) -> bool:
    """IA3's vector: as long as the rows or the columns it scales, or the whole bias."""
    vector = update.factors[0].numel
    if update.side == "bias":
        return math.prod(shape) == vector
    dims = (shape[1], shape[0]) if update.transpose else tuple(shape[:2])
    return len(shape) >= 2 and vector == (dims[1] if update.side == "in" else dims[0])


# kind → the one shape it fits, or else the rule it fits by; loha/lokr are checked by neither: ΔW is
# reshaped to W's shape, which fails on another size
EXPECTED: dict[Kind, Callable[[ModuleUpdate], tuple[int, ...]]] = {
    Kind.LORA: _low_rank, Kind.EMBEDDING: _low_rank, Kind.DORA: _low_rank, Kind.CONV: _low_rank,
    Kind.PARAM: _parameter, Kind.BIAS: _whole, Kind.REPLACE: _whole,
}
RULES: dict[Kind, Callable[[ModuleUpdate, tuple[int, ...]], bool]] = {Kind.IA3: _vector}


def expected_shape(update: ModuleUpdate) -> tuple[int, ...] | None:
    """The shape of the base tensor an update fits (None where only its size is checked)."""
    rule = EXPECTED.get(update.kind)
    return rule(update) if rule else None


def fits(update: ModuleUpdate, shape: tuple[int, ...]) -> bool:
    expected = expected_shape(update)
    if expected is not None:
        return tuple(shape) == expected
    rule = RULES.get(update.kind)
    return rule(update, shape) if rule else True
