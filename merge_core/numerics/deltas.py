"""ΔW of each adapter kind, in float32, with PEFT's operations in PEFT's order.

Each formula is the one PEFT 0.21's layer computes in get_delta_weight, so that adding it to W
(and rounding as PEFT rounds, see fuse.py) gives PEFT's bits:

- lora (Linear, GPT-2 Conv1D, 1×1 Conv2d) and embedding: (B @ A)·s, transposed where W is
  stored in×out (fan_in_fan_out; embeddings always);
- conv (k×k Conv2d, every Conv1d/Conv3d): convNd(Aᵀ, B)ᵀ·s;
- bias (lora_bias): lora_B.bias·s;
- loha: ((w1_a @ w1_b) ⊙ (w2_a @ w2_b))·s, or its CP form with t1/t2 (effective conv2d);
- lokr: kron(w1, w2)·s, each side full or a product of two factors (w2 also CP with t2);
- param (target_parameters): (B @ A)·s on a 2-D parameter; on E experts, with A as (E, r, in)
  and B as (out, r, E), einsum("o r e, e r i -> e o i")·s, or "-> e i o" where the model
  stores experts (E, in, out); one expert's share: the same einsum over that expert alone.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from merge_core.kinds import ExpertShare, Kind, is_conv_kernel

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _lora(t: Mapping[str, torch.Tensor], scale: float, transpose: bool, shape: Sequence[int],
          buffer: Callable[[tuple[int, ...]], torch.Tensor]) -> torch.Tensor:
    a, b = t["A"], t["B"]
    if a.dim() > 2:  # 1×1 Conv2d: PEFT squeezes the kernel dims and multiplies
        a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    product = buffer((b.shape[0], a.shape[1]))
    torch.matmul(b, a, out=product)
    product.mul_(scale)
    return product.T if transpose else product.view(tuple(shape))


def _conv(t: Mapping[str, torch.Tensor], scale: float, shape: Sequence[int]) -> torch.Tensor:
    a, b = t["A"], t["B"]
    return (_CONV[a.dim() - 2](a.transpose(0, 1), b).transpose(0, 1) * scale).reshape(tuple(shape))


def _loha(t: Mapping[str, torch.Tensor], scale: float, shape: Sequence[int]) -> torch.Tensor:
    factor = torch.tensor(scale)  # PEFT multiplies by a 0-dim float32 tensor
    if "t1" in t:
        first = torch.einsum("i j k l, j r, i p -> p r k l", t["t1"], t["w1_b"], t["w1_a"])
        second = torch.einsum("i j k l, j r, i p -> p r k l", t["t2"], t["w2_b"], t["w2_a"])
        delta = first * second * factor
    else:
        delta = ((t["w1_a"] @ t["w1_b"]) * (t["w2_a"] @ t["w2_b"])) * factor
    return delta.reshape(tuple(shape))


def _lokr(t: Mapping[str, torch.Tensor], scale: float, shape: Sequence[int]) -> torch.Tensor:
    w1 = t["w1"] if "w1" in t else t["w1_a"] @ t["w1_b"]
    if "w2" in t:
        w2 = t["w2"]
    elif "t2" in t:
        w2 = torch.einsum("i j k l, i p, j r -> p r k l", t["t2"], t["w2_a"], t["w2_b"])
    else:
        w2 = t["w2_a"] @ t["w2_b"]
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    return (torch.kron(w1, w2.contiguous()) * scale).reshape(tuple(shape))


def _param(t: Mapping[str, torch.Tensor], scale: float, transpose: bool, experts: ExpertShare) -> torch.Tensor:
    a, b = t["A"], t["B"]
    count = experts.count
    if count == 1:  # a 2-D parameter: PEFT takes Linear's formula
        return (b @ a).mul_(scale)
    if experts.index is None:  # scaled in place (the same bits as PEFT's `* scaling`): ΔW of all experts is large
        equation = "o r e, e r i -> e i o" if transpose else "o r e, e r i -> e o i"
        return torch.einsum(equation, b.reshape(b.shape[0], -1, count), a.reshape(count, -1, a.shape[-1])).mul_(scale)
    # expert e's share, stored as a tensor of its own: A holds its r rows, B the share's rows
    e = experts.index
    share = torch.einsum("o r e, e r i -> e o i", b.reshape(b.shape[0], -1, count)[:, :, e:e + 1],
                         a.reshape(1, -1, a.shape[-1]))
    return share[0] * scale


def delta_weight(kind: Kind, tensors: Mapping[str, torch.Tensor], scale: float, transpose: bool,
                 shape: Sequence[int], buffer: Callable[[tuple[int, ...]], torch.Tensor],
                 experts: ExpertShare | None = None) -> torch.Tensor:
    """ΔW for one update, shaped as the stored W (possibly a transposed view). Matmul kinds
    compute into `buffer(shape)`, reused between tensors; the rarer kinds allocate."""
    if kind in (Kind.LORA, Kind.EMBEDDING, Kind.DORA, Kind.CONV):
        if kind is Kind.CONV or is_conv_kernel(tensors["A"].shape):  # DoRA on a conv, too
            return _conv(tensors, scale, shape)
        return _lora(tensors, scale, transpose, shape, buffer)
    if kind is Kind.BIAS:
        return tensors["bias"] * scale
    if kind is Kind.LOHA:
        return _loha(tensors, scale, shape)
    if kind is Kind.LOKR:
        return _lokr(tensors, scale, shape)
    if kind is Kind.PARAM:
        return _param(tensors, scale, transpose, experts)
    raise ValueError(f"no ΔW formula for {kind!r}")
