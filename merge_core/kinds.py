"""What an update does to its base tensor: one row of facts per kind (a leaf: imports nothing).

A new kind is a new row here and a ΔW formula in merge_core.numerics.deltas; every other
module asks these facts instead of comparing names.

    kind       what it does to W (ΔW in float32; dt is W's dtype)
    lora       W ← round(W + (B@A)[ᵀ]·s)           Linear, GPT-2 Conv1D (transposed), 1×1 conv
    conv       W ← round(W + conv(Aᵀ, B)ᵀ·s)        k×k convolutions
    embedding  W ← round(W + round(ΔW))             nn.Embedding: PEFT adds ΔW rounded to dt
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


@dataclass(frozen=True)
class KindFacts:
    # How the fuse applies it: "add" (W + ΣΔW), "add_rounded" (W + round(ΔW), PEFT rounds ΔW to
    # W's dtype first), "dora", "ia3" (a product) or "replace".
    stage: str
    # A sum term: may be weighted (--weight) and combined (--combine). DoRA is not one: its
    # magnitude vector was trained for the whole ΔW it normalises.
    additive: bool
    # Carries an adapter scale (alpha/r, recorded in the manifest).
    scaled: bool
    # ΔW = B·A over a rank r: the float64 spot check can recompute a row of it.
    low_rank: bool
    # How PEFT's unmerge_adapter() takes it back out: "sub_rounded" (W − round(ΔW): LoRA rounds ΔW
    # to W's dtype before subtracting, unlike its merge), "sub" (W − ΔW), "ia3_div" (W ÷ (l + 1e-8)),
    # or None where it cannot (DoRA needs the norm of the weight before the merge; a copy replaced
    # the tensor whole).
    unmerge: str | None = None


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
        return FACTS[self].stage == "add_rounded"


FACTS = {
    Kind.LORA: KindFacts("add", additive=True, scaled=True, low_rank=True, unmerge="sub_rounded"),
    Kind.CONV: KindFacts("add", additive=True, scaled=True, low_rank=False, unmerge="sub_rounded"),
    Kind.EMBEDDING: KindFacts("add_rounded", additive=True, scaled=True, low_rank=False, unmerge="sub_rounded"),
    Kind.DORA: KindFacts("dora", additive=False, scaled=True, low_rank=False),
    Kind.BIAS: KindFacts("add", additive=True, scaled=True, low_rank=False, unmerge="sub"),
    Kind.LOHA: KindFacts("add", additive=True, scaled=True, low_rank=False, unmerge="sub"),
    Kind.LOKR: KindFacts("add", additive=True, scaled=True, low_rank=False, unmerge="sub"),
    Kind.IA3: KindFacts("ia3", additive=False, scaled=False, low_rank=False, unmerge="ia3_div"),
    Kind.PARAM: KindFacts("add_rounded", additive=True, scaled=True, low_rank=True, unmerge="sub_rounded"),
    Kind.REPLACE: KindFacts("replace", additive=False, scaled=False, low_rank=False),
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
