"""One op per kind of update (merge_core.kinds), as PEFT 0.21's layers and variants compute it: how
its ΔW is formed, how it is applied to W, and how it is taken back out, or that it cannot be.

    kind       ΔW                                      merge W' =              unmerge W =
    lora       (B·A)·s, ᵀ where W is stored in×out      round(W + ΔW)           round(W − round(ΔW))
    conv       convNd(Aᵀ, B)ᵀ·s                          round(W + ΔW)           round(W − round(ΔW))
    embedding  (B·A)ᵀ·s                                  round(W + round(ΔW))    round(W − round(ΔW))
    param      (B·A)·s, or per expert an einsum         round(W + round(ΔW))    round(W − round(ΔW))
    bias       lora_B.bias·s                             round(b + ΔW)           round(b − ΔW)
    loha       ((w1_a·w1_b) ⊙ (w2_a·w2_b))·s, or CP     round(W + ΔW)           round(W − ΔW)
    lokr       kron(w1, w2)·s                            round(W + ΔW)           round(W − ΔW)
    dora       as lora (or conv)                         round(m/‖W+ΔW‖·(W+ΔW))  cannot: ‖W‖ is not recorded
    ia3        l, along rows or columns                  round(W · l)            round(W ÷ (l + 1e-8))
    replace    -                                         round(T)                cannot: W was replaced whole

round() is to W's dtype. Each formula is PEFT's get_delta_weight, merge or unmerge_adapter with
the same operations in the same order, in float32 (float64 for a float64 base): that is what
makes the fuse's result PEFT's bits. The fuse (merge_core.numerics.fuse) groups the terms into
stages, calls `operand` once per term and `merge` (or `unmerge`) per block of rows, and rounds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import KW_ONLY, dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from merge_core.kinds import ExpertShare, Kind, is_conv_kernel

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
IA3_UNMERGE_EPSILON = 1e-8  # PEFT's guard against dividing by a zero IA3 vector

Buffer = Callable[[tuple[int, ...]], torch.Tensor]  # a reused float buffer of the given shape


@dataclass(frozen=True)
class Term:
    """One adapter's update of the tensor being fused, with its tensors loaded."""
    kind: Kind
    tensors: Mapping[str, torch.Tensor]  # by role: A, B, magnitude, l, tensor, w1_a, ...
    scale: float = 1.0  # its scale, times its --weight unless the adapters are combined
    _: KW_ONLY
    transpose: bool = False  # W stored in×out (fan_in_fan_out, embeddings): ΔW is transposed
    side: str = ""  # ia3: which side the vector scales ("in", "out" or "bias")
    experts: ExpertShare | None = None  # param: the experts it covers
    weight: float = 1.0  # its --weight, which a combination (--combine) applies to the whole ΔW

    @property
    def op(self) -> Op:
        return OPS[self.kind]


@dataclass
class Stage:
    """Terms applied to the running W together, and rounded to W's dtype after, as PEFT rounds after
    each in-place update of the weight."""
    op: Op
    terms: list[Term]
    _: KW_ONLY
    undo: bool = False  # take the terms back out (unmerge)
    # Set by the fuse before the first block: the terms with their tensors on its device, what the
    # op applies (ΔW summed over the terms) as rows × rest, and W as stored (its dtype and shape)
    loaded: list[Term] = field(default_factory=list)
    operand: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    # For the report, with several updates: each term's ‖ΔW‖ (a sum), or else the stage's change,
    # ‖W after − W before‖², summed over the blocks
    norms: list[float] = field(default_factory=list)
    change_sq: float = 0.0

    @property
    def plain_sum(self) -> bool:
        """W + ΣΔW as it is: the change it makes is its operand."""
        facts = self.terms[0].kind.facts
        return not self.undo and facts.additive and not facts.rounds_delta

    def apply(self, x: torch.Tensor, rows: slice) -> None:
        """The stage on a block of rows of the running W (`x`, float32), in place."""
        (self.op.unmerge if self.undo else self.op.merge)(x, self, rows)

    def rounded(self, rows: slice, x: torch.Tensor) -> torch.Tensor:
        """The operand's rows rounded to W's dtype, where PEFT rounds ΔW before adding or subtracting it."""
        return self.operand[rows].to(self.weight.dtype).to(x.dtype)


class Op:
    """What one kind does to W. `operand` is what a stage applies, computed once per term on the
    fuse's device (the operands of a sum are added up); `merge` and `unmerge` apply it to a block of
    rows of the running W in float32, in place."""
    first = False  # applied before every other update of W
    is_delta = True  # the operand is ΔW (the report's ‖ΔW‖ of the term), not a factor or a copy

    def on_device(self, term: Term, device: torch.device, compute: torch.dtype) -> Term:
        """The term with its tensors as the fuse computes with them (PEFT upcasts adapters to float32)."""
        return dataclasses.replace(term, tensors={k: v.to(device, compute) for k, v in term.tensors.items()})

    def operand(self, term: Term, shape: Sequence[int], buffer: Buffer) -> torch.Tensor:
        """ΔW, shaped as the stored W (possibly a transposed view)."""
        raise NotImplementedError

    def merge(self, x: torch.Tensor, stage: Stage, rows: slice) -> None:
        x.add_(stage.operand[rows])

    def unmerge(self, x: torch.Tensor, stage: Stage, rows: slice) -> None:
        x.sub_(stage.operand[rows])

    def needs_every_row(self, stage: Stage) -> bool:
        """Whether a block must hold all of W's rows."""
        return False


class Lora(Op):
    """LoRA on Linear, GPT-2's Conv1D (W stored in×out: ΔW transposed) and 1×1 Conv2d."""

    def operand(self, term: Term, shape: Sequence[int], buffer: Buffer) -> torch.Tensor:
        a, b = term.tensors["A"], term.tensors["B"]
        if a.dim() > 2:  # 1×1 Conv2d: PEFT squeezes the kernel dims and multiplies
            a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        delta = torch.matmul(b, a, out=buffer((b.shape[0], a.shape[1])))  # B·A
        delta.mul_(term.scale)  # ·s
        return delta.T if term.transpose else delta.view(tuple(shape))

    def merge(self, x: torch.Tensor, stage: Stage, rows: slice) -> None:
        x.add_(stage.operand[rows])  # W + ΔW, which the fuse rounds once: PEFT's W += ΔW

    def unmerge(self, x: torch.Tensor, stage: Stage, rows: slice) -> None:
        x.sub_(stage.rounded(rows, x))  # PEFT's unmerge: W -= ΔW.to(W.dtype)


class Conv(Lora):
    """LoRA on k×k convolutions (and every Conv1d/Conv3d): PEFT merges them with convNd."""

    def operand(self, term: Term, shape: Sequence[int], buffer: Buffer) -> torch.Tensor:
        a, b = term.tensors["A"], term.tensors["B"]
        return (_CONV[a.dim() - 2](a.transpose(0, 1), b).transpose(0, 1) * term.scale).reshape(tuple(shape))


class Embedding(Lora):
    """LoRA on nn.Embedding, whose W PEFT sees stored in×out; its merge adds ΔW rounded to W's dtype."""

    def merge(self, x: torch.Tensor, stage: Stage, rows: slice) -> None:
        x.add_(stage.rounded(rows, x))  # PEFT's Embedding.merge: W += ΔW.to(W.dtype)


class Parameter(Embedding):
    """LoRA on parameters (target_parameters, MoE experts): PEFT's ParamWrapper. A 2-D parameter takes
    Linear's formula; E experts, with A as (E, r, in) and B as (out, r, E), an einsum to (E, out, in)
    or (E, in, out) as the model stores them; one expert's own tensor, the same over that expert."""

    def operand(self, term: Term, shape: Sequence[int], buffer: Buffer) -> torch.Tensor:
        a, b, experts = term.tensors["A"], term.tensors["B"], term.experts
        count = experts.count
        if count == 1:
            return (b @ a).mul_(term.scale)
        if experts.index is None:  # scaled in place (the same bits as PEFT's `* scaling`): ΔW of all experts is large
            equation = "o r e, e r i -> e i o" if term.transpose else "o r e, e r i -> e o i"
            product = torch.einsum(equation, b.reshape(b.shape[0], -1, count), a.reshape(count, -1, a.shape[-1]))
            return product.mul_(term.scale)
        # expert e's share, stored as a tensor of its own: A holds its r rows, B the share's rows
        e = experts.index
        share = torch.einsum("o r e, e r i -> e o i", b.reshape(b.shape[0], -1, count)[:, :, e:e + 1],
                             a.reshape(1, -1, a.shape[-1]))
        return share[0] * term.scale


class Bias(Op):
    """lora_bias: lora_B's bias, scaled, added to the layer's bias."""

    def operand(self, term: Term, shape: Sequence[int], buffer: Buffer) -> torch.Tensor:
        return term.tensors["bias"] * term.scale


class LoHa(Op):
    """LyCORIS LoHa: the Hadamard product of two low-rank products, or its CP form (t1/t2) on convs."""

    def operand(self, term: Term, shape: Sequence[int], buffer: Buffer) -> torch.Tensor:
        t = term.tensors
        factor = torch.tensor(term.scale)  # PEFT multiplies by a 0-dim float32 tensor
        if "t1" in t:
            first = torch.einsum("i j k l, j r, i p -> p r k l", t["t1"], t["w1_b"], t["w1_a"])
            second = torch.einsum("i j k l, j r, i p -> p r k l", t["t2"], t["w2_b"], t["w2_a"])
            delta = first * second * factor
        else:
            delta = ((t["w1_a"] @ t["w1_b"]) * (t["w2_a"] @ t["w2_b"])) * factor
        return delta.reshape(tuple(shape))


class LoKr(Op):
    """LyCORIS LoKr: a Kronecker product, each side whole or a product of two factors (w2 also CP)."""

    def operand(self, term: Term, shape: Sequence[int], buffer: Buffer) -> torch.Tensor:
        t = term.tensors
        w1 = t["w1"] if "w1" in t else t["w1_a"] @ t["w1_b"]
        if "w2" in t:
            w2 = t["w2"]
        elif "t2" in t:
            w2 = torch.einsum("i j k l, i p, j r -> p r k l", t["t2"], t["w2_a"], t["w2_b"])
        else:
            w2 = t["w2_a"] @ t["w2_b"]
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        return (torch.kron(w1, w2.contiguous()) * term.scale).reshape(tuple(shape))


class DoRA(Op):
    """DoRA: ΔW as LoRA's (or conv's), then W + ΔW scaled to the magnitude m per output, the norm
    taken as PEFT takes it. Cannot be taken back out: the merge divided by ‖W + ΔW‖ of the weight
    before it, which nothing records."""

    def operand(self, term: Term, shape: Sequence[int], buffer: Buffer) -> torch.Tensor:
        low_rank = OPS[Kind.CONV] if is_conv_kernel(term.tensors["A"].shape) else OPS[Kind.LORA]
        return low_rank.operand(term, shape, buffer)

    def merge(self, x: torch.Tensor, stage: Stage, rows: slice) -> None:
        x.add_(stage.operand[rows])
        term, weight = stage.loaded[0], stage.weight
        magnitude = term.tensors["magnitude"].reshape(-1)
        if term.transpose:  # stored in×out (embeddings, fan_in_fan_out): a norm per column, whole tensor
            x.mul_((magnitude / torch.linalg.norm(x.T, dim=1)).view(1, -1))
        elif weight.dim() > 2:  # convolutions: the norm over all but the output channel
            full = x.view(x.shape[0], *weight.shape[1:])
            norm = full.norm(p=2, dim=tuple(range(1, weight.dim())), keepdim=True).reshape(-1)
            x.mul_((magnitude[rows] / norm).view(-1, 1))
        else:
            x.mul_((magnitude[rows] / torch.linalg.norm(x, dim=1)).view(-1, 1))

    def unmerge(self, x: torch.Tensor, stage: Stage, rows: slice) -> None:
        raise ValueError("a DoRA merge cannot be taken back out")  # the planner refuses it first

    def needs_every_row(self, stage: Stage) -> bool:
        return stage.terms[0].transpose  # W stored in×out: a norm per column


class IA3(Op):
    """IA3: W scaled by a learned vector l, along its input or output dimension (the bias with the
    outputs); taken out by dividing by l + 1e-8, as PEFT's unmerge does."""
    is_delta = False

    def operand(self, term: Term, shape: Sequence[int], buffer: Buffer) -> torch.Tensor:
        vector = term.tensors["l"]
        if term.side == "bias":
            return vector.reshape(tuple(shape))
        if len(shape) == 2:
            return vector.T if term.transpose else vector
        # convolutions: (1, C_in, 1, …) on feedforward layers, (1, C_out, 1, …) transposed otherwise
        return (vector if term.side == "in" else vector.transpose(0, 1)).expand(tuple(shape))

    def merge(self, x: torch.Tensor, stage: Stage, rows: slice) -> None:
        x.mul_(_scaling(stage, rows))

    def unmerge(self, x: torch.Tensor, stage: Stage, rows: slice) -> None:
        x.div_(_scaling(stage, rows) + IA3_UNMERGE_EPSILON)  # PEFT: W / (l + 1e-8), the sum rounded first


def _scaling(stage: Stage, rows: slice) -> torch.Tensor:
    """IA3's multiplier for a block: its rows, or the one row every row shares."""
    return stage.operand[rows] if stage.operand.shape[0] > 1 else stage.operand


class Replace(Op):
    """A whole copy (modules_to_save, an embedding PEFT saved whole): W becomes the saved tensor.
    Copies are applied before any update, as PEFT loads them before it merges."""
    first = True
    is_delta = False

    def on_device(self, term: Term, device: torch.device, compute: torch.dtype) -> Term:
        return dataclasses.replace(term, tensors={k: v.to(device) for k, v in term.tensors.items()})

    def operand(self, term: Term, shape: Sequence[int], buffer: Buffer) -> torch.Tensor:
        return term.tensors["tensor"]

    def merge(self, x: torch.Tensor, stage: Stage, rows: slice) -> None:
        x.copy_(stage.operand[rows])

    def unmerge(self, x: torch.Tensor, stage: Stage, rows: slice) -> None:
        raise ValueError("a whole copy cannot be taken back out")  # the planner refuses it first


OPS: dict[Kind, Op] = {
    Kind.LORA: Lora(), Kind.CONV: Conv(), Kind.EMBEDDING: Embedding(), Kind.PARAM: Parameter(),
    Kind.BIAS: Bias(), Kind.LOHA: LoHa(), Kind.LOKR: LoKr(), Kind.DORA: DoRA(), Kind.IA3: IA3(),
    Kind.REPLACE: Replace(),
}
