"""Combining several adapters' full deltas for one tensor: ties, dare_linear, dare_ties, magnitude_prune.

The definitions are those of PEFT's `peft/utils/merge_utils.py` (TIES-Merging, Yadav et al. 2023;
DARE, Yu et al. 2023), applied to each adapter's full float32 delta ΔW_i (its LoRA scale included,
its --weight not). With p_i the pruned delta of adapter i and w_i its weight:

* magnitude_prune: p_i = ΔW_i with all but its k = int(density * numel) largest-magnitude entries
  zeroed; result = Σ_i w_i·p_i.
* dare_linear: p_i = (ΔW_i · m_i) / density, m_i a Bernoulli(density) keep mask; result = Σ_i w_i·p_i.
* ties: p_i as in magnitude_prune; then sign election and disjoint merge (below).
* dare_ties: p_i as in dare_linear; then sign election and disjoint merge.

Sign election and disjoint merge (PEFT's `calculate_majority_sign_mask` and `disjoint_merge`):
the majority sign is elected on the *unweighted* pruned deltas — "total": sign(Σ_i p_i),
"frequency": sign(Σ_i sign(p_i)), a zero sum electing +1. Adapter i agrees at an entry where
sign(p_i) equals the majority sign (so a zero entry, pruned or not, never agrees). The weights are
applied *after* the election and *before* the merge, exactly as in PEFT's `ties`/`dare_ties`:

    result = Σ_i [agree_i] · (w_i · p_i)  /  max(1, Σ_i [agree_i])

i.e. the mean over the agreeing adapters of the weighted pruned deltas (a negative weight therefore
does not change the election, only the contribution).

Where this differs from PEFT on purpose:

* density >= 1 means no pruning (PEFT's `prune` returns the tensor unchanged; for dare that is also
  what mask=all, rescale=1 gives).
* The dare masks are not drawn from torch's global RNG but from a private CPU `torch.Generator`
  seeded with a SHA-256 of f"{seed}:{tensor_name}:{index}" (see `dare_keep_mask`): a mask depends
  only on (seed, tensor name, adapter index), never on the worker, the device, or the order in which
  tensors are processed, and the global RNG is left untouched. An entry is kept where a float32
  uniform draw from `torch.rand` is < density.
* The top-k is computed as a threshold (the k-th largest magnitude via `kthvalue`), which is cheaper
  in time and memory; when entries tie at that threshold (or there are NaNs) it falls back to
  `torch.topk` on the same flattened magnitudes with the same k, i.e. PEFT's own call, so the kept
  set, tie choice included, is PEFT's.
* The adapters are streamed instead of stacked: keep masks are stored as bool (1 byte/entry per
  adapter) and the pruned deltas are recomputed from the inputs, so the peak is a few float32
  tensors of the tensor's size, not n of them. The sums therefore run in adapter order
  ((p_0 + p_1) + p_2 ...), which is what a sum over dim 0 of the stacked tensor does on a CPU too.

Pure torch, no I/O, no Ray. Inputs are never modified.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from merge_core.errors import InputError
from merge_core.numerics.arithmetic import Combination, check_combine

_MAGNITUDE = ("ties", "magnitude_prune")
_ELECTING = ("ties", "dare_ties")


def mask_seed(seed: int, tensor_name: str, index: int) -> int:
    """A stable 63-bit generator seed for adapter `index`'s mask of `tensor_name`."""
    digest = hashlib.sha256(f"{seed}:{tensor_name}:{index}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def dare_keep_mask(shape: Sequence[int] | torch.Size, density: float, seed: int, tensor_name: str,
                   index: int, device: torch.device | str | None = None) -> torch.Tensor:
    """DARE's Bernoulli(density) keep mask (bool) for adapter `index` of `tensor_name`.

    Always drawn on the CPU (CUDA generators give other streams), then moved to `device`.
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(mask_seed(seed, tensor_name, index))
    draws = torch.rand(tuple(shape), generator=generator, dtype=torch.float32)
    mask = draws < density
    del draws
    return mask if device is None else mask.to(device)


def magnitude_keep_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """The bool mask of delta's k = int(density * numel) largest-magnitude entries (PEFT's set)."""
    numel = delta.numel()
    k = int(density * numel)
    if k >= numel:
        return torch.ones(delta.shape, dtype=torch.bool, device=delta.device)
    if k <= 0:
        return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
    magnitude = delta.abs().reshape(-1)
    threshold = torch.kthvalue(magnitude, numel - k + 1).values
    mask = magnitude >= threshold
    if int(mask.sum()) != k:  # ties at the threshold, or NaNs: take PEFT's own topk choice
        indices = torch.topk(magnitude, k=k, largest=True).indices
        mask.zero_()
        mask[indices] = True
        del indices
    del magnitude
    return mask.reshape(delta.shape)


class _Pruner:
    """Each adapter's pruned delta p_i and its keep mask, recomputed on demand (not stored: n of
    them would not fit beside the tensor)."""

    def __init__(self, deltas: list, combination: Combination, tensor_name: str):
        self.device = deltas[0].device
        self.deltas = [d.to(device=self.device, dtype=torch.float32) for d in deltas]  # no copy when already so
        self.shape = deltas[0].shape
        self.combination, self.tensor_name = combination, tensor_name
        self.density = float(combination.density)

    def keep_mask(self, i: int) -> torch.Tensor | None:
        if self.density >= 1.0:
            return None
        if self.combination.method in _MAGNITUDE:
            return magnitude_keep_mask(self.deltas[i], self.density)
        return dare_keep_mask(self.shape, self.density, self.combination.seed, self.tensor_name, i, self.device)

    def pruned(self, i: int, mask: torch.Tensor | None) -> torch.Tensor:
        """p_i as a fresh tensor the caller may modify in place."""
        if mask is None:
            return self.deltas[i].clone()
        p = self.deltas[i] * mask  # PEFT: tensor * mask
        if self.combination.method not in _MAGNITUDE:
            p.div_(self.density)  # PEFT: pruned_tensor / density
        return p


def _weighted_sum(pruner: _Pruner, weights: list[float]) -> torch.Tensor:
    """magnitude_prune, dare_linear: Σ w_i · p_i."""
    out = torch.zeros(pruner.shape, dtype=torch.float32, device=pruner.device)
    for i, weight in enumerate(weights):
        p = pruner.pruned(i, pruner.keep_mask(i))
        p.mul_(float(weight))
        out.add_(p)
        del p
    return out


def _elected_mean(pruner: _Pruner, weights: list[float]) -> torch.Tensor:
    """ties, dare_ties: the majority sign elected on the unweighted p_i, then the mean of the
    weighted p_i over the adapters that agree with it."""
    masks: list[torch.Tensor | None] = []
    elect = torch.zeros(pruner.shape, dtype=torch.float32, device=pruner.device)
    for i in range(len(weights)):
        masks.append(pruner.keep_mask(i))
        p = pruner.pruned(i, masks[i])
        elect.add_(p if pruner.combination.majority_sign_method == "total" else p.sign_())
        del p
    positive = elect >= 0  # majority sign: +1 where the sum is >= 0, else -1
    del elect
    out = torch.zeros(pruner.shape, dtype=torch.float32, device=pruner.device)
    count = torch.zeros(pruner.shape, dtype=torch.float32, device=pruner.device)
    for i, weight in enumerate(weights):
        p = pruner.pruned(i, masks[i])
        masks[i] = None
        agree = torch.where(positive, p > 0, p < 0)  # sign(p_i) == majority sign
        p.mul_(float(weight))  # weights after the election, before the merge (PEFT)
        p.mul_(agree)
        out.add_(p)
        del p
        count.add_(agree)
        del agree
    del positive
    return out.div_(count.clamp_(min=1.0))


def combine_deltas(deltas: list[torch.Tensor], weights: list[float], combination: Combination,
                   tensor_name: str) -> torch.Tensor:
    """The combined float32 ΔW of `deltas` (adapter order) with `weights`; see the module docstring."""
    check_combine(combination)
    if not deltas:
        raise ValueError(f"{tensor_name}: no deltas to combine")
    if len(deltas) != len(weights):
        raise ValueError(f"{tensor_name}: {len(deltas)} deltas but {len(weights)} weights")
    shape = deltas[0].shape
    for i, delta in enumerate(deltas):
        if delta.shape != shape:
            raise InputError(tensor_name, f"adapter {i}'s delta has shape {tuple(delta.shape)}, "
                             f"adapter 0's has {tuple(shape)}",
                             "combine only adapters trained on the same base model")
    pruner = _Pruner(deltas, combination, tensor_name)
    return _elected_mean(pruner, weights) if combination.method in _ELECTING else _weighted_sum(pruner, weights)
