"""The kinds of update an adapter makes to its base tensor, with one row of facts each (a leaf:
imports nothing). What each kind computes (its ΔW, how it is applied to W and taken back out) is
its op in merge_core.numerics.ops; these facts are what planning, the spot check and the manifest
need to know of it without torch.

    kind       what it does to W (ΔW in float32; round() to W's dtype)
    lora       W ← round(W + (B@A)[ᵀ]·s)           Linear, GPT-2 Conv1D (transposed), 1×1 conv
    conv       W ← round(W + conv(Aᵀ, B)ᵀ·s)        k×k convolutions
    embedding  W ← round(W + round(ΔW))             nn.Embedding: PEFT adds ΔW rounded to W's dtype
    dora       W ← round(m/‖W+ΔW‖ · (W+ΔW))         DoRA on Linear/Conv1D/Embedding/conv
    bias       b ← round(b + s·lora_B.bias)          lora_bias
    loha/lokr  W ← round(W + ΔW)                    LyCORIS formulas
    param      W ← round(W + round(ΔW))             target_parameters (MoE experts): PEFT's ParamWrapper
    ia3        W ← round(W · l)                      rows or columns; the bias with the rows
    replace    W ← round(T)                          modules_to_save, and embeddings PEFT saved whole
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Sequence


@dataclass(frozen=True, kw_only=True)
class KindFacts:
    # A sum term, W + ΔW: may be weighted (--weight) and combined (--combine), and sums PEFT rounds
    # alike share one rounding. DoRA is not one: its magnitude vector was trained for the whole ΔW
    # it normalises.
    additive: bool = False
    # Carries an adapter scale (alpha/r, recorded in the manifest).
    scaled: bool = False
    # ΔW = B·A over a rank r: the float64 spot check can recompute a row of it.
    low_rank: bool = False
    # PEFT's merge adds ΔW rounded to W's dtype (W + round(ΔW)), not ΔW itself.
    rounds_delta: bool = False
    # PEFT's unmerge subtracts ΔW rounded to W's dtype first (LoRA, unlike its merge), not ΔW itself.
    rounds_delta_out: bool = False
    # Why PEFT's unmerge_adapter() cannot take it back out; "" where it can.
    irreversible: str = ""
    # The adapter's own copy of the tensor, which replaces it whole (modules_to_save).
    whole: bool = False
    # LoRA on a parameter (target_parameters): it may land on one tensor per expert, and its scale is
    # recorded by parameter, several of which one module may hold.
    per_parameter: bool = False
    # Normalises W + ΔW as a whole: it cannot follow another adapter's update of W.
    normalises: bool = False

    @property
    def reversible(self) -> bool:
        return not self.irreversible


class Kind(str, Enum):
    LORA = "lora"
    CONV = "conv"
    EMBEDDING = "embedding"
    DORA = "dora"
    BIAS = "bias"
    LOHA = "loha"
    LOKR = "lokr"
    IA3 = "ia3"
    PARAM = "param"
    REPLACE = "replace"

    def __str__(self) -> str:  # messages and JSON say "lora", not "Kind.LORA"
        return self.value

    @property
    def facts(self) -> KindFacts:
        return FACTS[self]

    @property
    def additive(self) -> bool:
        return FACTS[self].additive

    @property
    def rounds_delta(self) -> bool:
        return FACTS[self].rounds_delta


FACTS = {
    Kind.LORA: KindFacts(additive=True, scaled=True, low_rank=True, rounds_delta_out=True),
    Kind.CONV: KindFacts(additive=True, scaled=True, rounds_delta_out=True),
    Kind.EMBEDDING: KindFacts(additive=True, scaled=True, rounds_delta=True, rounds_delta_out=True),
    Kind.DORA: KindFacts(scaled=True, normalises=True, irreversible="DoRA's merge normalised by the norm of the "
                         "weight before it, which neither the merged model nor the adapter records"),
    Kind.BIAS: KindFacts(additive=True, scaled=True),
    Kind.LOHA: KindFacts(additive=True, scaled=True),
    Kind.LOKR: KindFacts(additive=True, scaled=True),
    Kind.IA3: KindFacts(),
    Kind.PARAM: KindFacts(additive=True, scaled=True, low_rank=True, rounds_delta=True, rounds_delta_out=True,
                          per_parameter=True),
    Kind.REPLACE: KindFacts(whole=True, irreversible="the adapter's copy replaced the tensor whole "
                            "(modules_to_save, or an embedding saved with the adapter)"),
}


@dataclass(frozen=True)
class ExpertShare:
    """Which experts LoRA on a parameter (target_parameters) covers. `count` 1 is a 2-D
    parameter; else `count` experts, all of them in one (E, ·, ·) tensor, or (with `index`) the
    one expert whose tensor the checkpoint stores on its own."""
    count: int
    index: int | None = None

    @property
    def two_d(self) -> bool:
        """A 2-D tensor: a parameter of its own, or one expert's share of a 3-D one."""
        return self.count == 1 or self.index is not None


def is_conv_kernel(a_shape: Sequence[int]) -> bool:
    """Whether lora_A belongs to a convolution PEFT merges with convNd (every conv but 1×1 Conv2d,
    which PEFT merges as a matrix product)."""
    return len(a_shape) > 2 and not (len(a_shape) == 4 and tuple(a_shape[2:]) == (1, 1))
