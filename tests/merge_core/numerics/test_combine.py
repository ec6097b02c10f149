"""combine_deltas against a float64 numpy reference of the published definitions, and against PEFT."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from merge_core.errors import InputError
from merge_core.numerics.arithmetic import COMBINE_METHODS, Arithmetic, Combination, check_combine
from merge_core.numerics.combine import combine_deltas, dare_keep_mask, mask_seed

EPS32 = float(np.finfo(np.float32).eps)


# ---------------------------------------------------------------- the float64 reference (numpy only)

def _ref_magnitude_mask(x: np.ndarray, density: float) -> np.ndarray:
    """Keep the k = int(density * numel) largest |x| (inputs here have no ties)."""
    flat = np.abs(x).reshape(-1)
    k = int(density * flat.size)
    keep = np.zeros(flat.size, dtype=bool)
    keep[np.argsort(-flat, kind="stable")[:k]] = True
    return keep.reshape(x.shape)


def reference(deltas, weights, method, density, seed=0, sign_method="total", name="t"):
    """Returns (result, error scale): the combination in float64, and the magnitudes it sums."""
    xs = [d.numpy().astype(np.float64) for d in deltas]
    ps = []
    for i, x in enumerate(xs):
        if density >= 1:
            ps.append(x)
        elif method in ("ties", "magnitude_prune"):
            ps.append(x * _ref_magnitude_mask(x, density))
        else:  # DARE: Bernoulli(density) keep, rescale by 1/density; the mask is the shared seeded one
            keep = dare_keep_mask(x.shape, density, seed, name, i).numpy()
            ps.append(x * keep / density)
    weighted = [w * p for w, p in zip(weights, ps)]
    if method in ("magnitude_prune", "dare_linear"):
        return sum(weighted), sum(np.abs(t) for t in weighted)
    # TIES election on the unweighted pruned deltas, then the disjoint mean of the weighted ones.
    if sign_method == "total":
        elect = sum(ps)
    else:
        elect = sum(np.sign(p) for p in ps)
    majority = np.where(elect >= 0, 1.0, -1.0)
    agree = [np.sign(p) == majority for p in ps]
    count = np.maximum(sum(a.astype(np.float64) for a in agree), 1.0)
    merged = sum(t * a for t, a in zip(weighted, agree)) / count
    scale = sum(np.abs(t) * a for t, a in zip(weighted, agree)) / count
    return merged, scale


def assert_matches_reference(got: torch.Tensor, ref: np.ndarray, scale: np.ndarray, ulps: float = 8.0):
    assert got.dtype == torch.float32
    got64 = got.numpy().astype(np.float64)
    err = np.abs(got64 - ref)
    bound = ulps * EPS32 * scale + 1e-37
    worst = np.argmax(err - bound)
    assert np.all(err <= bound), (f"at {np.unravel_index(worst, ref.shape)}: got {got64.flat[worst]!r}, "
                                  f"reference {ref.flat[worst]!r}, scale {scale.flat[worst]!r}")


def random_deltas(n: int, shape, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # different magnitudes per adapter, as adapters with different LoRA scales have
    return [torch.randn(shape, generator=gen, dtype=torch.float32) * (0.01 * (i + 1)) for i in range(n)]


CASES = [
    ([0.7, 0.3], (64, 48)),
    ([0.5, 0.3, 0.2], (40, 3, 17)),
    ([1.0, -0.4, 0.6], (257,)),
]


# the sign method only matters for the electing methods
METHOD_SIGNS = [(m, "total") for m in COMBINE_METHODS] + [("ties", "frequency"), ("dare_ties", "frequency")]


@pytest.mark.parametrize("method,sign_method", METHOD_SIGNS)
@pytest.mark.parametrize("weights,shape", CASES)
@pytest.mark.parametrize("density", [0.3, 0.75, 1.0])
def test_matches_float64_reference(method, sign_method, weights, shape, density):
    deltas = random_deltas(len(weights), shape, seed=100 * COMBINE_METHODS.index(method) + 10 * len(shape) + int(density * 4))
    spec = Combination(method, density, seed=11, majority_sign_method=sign_method)
    got = combine_deltas(deltas, weights, spec, "model.layers.0.q_proj.weight")
    ref, scale = reference(deltas, weights, method, density, seed=11, sign_method=sign_method,
                           name="model.layers.0.q_proj.weight")
    assert got.shape == deltas[0].shape
    assert_matches_reference(got, ref, scale)


def test_pruning_keeps_the_stated_fraction():
    deltas = random_deltas(1, (100, 50), seed=3)
    out = combine_deltas(deltas, [1.0], Combination("magnitude_prune", 0.3), "w")
    assert int((out != 0).sum()) == int(0.3 * 5000)
    keep = dare_keep_mask((200, 500), 0.3, seed=0, tensor_name="w", index=0)
    assert keep.dtype == torch.bool and abs(keep.float().mean().item() - 0.3) < 0.01


def test_inputs_are_not_modified():
    deltas = random_deltas(3, (30, 20), seed=4)
    before = [d.clone() for d in deltas]
    for method in COMBINE_METHODS:
        combine_deltas(deltas, [0.5, 0.3, 0.2], Combination(method, 0.5, seed=1), "w")
    assert all(torch.equal(a, b) for a, b in zip(deltas, before))


# ---------------------------------------------------------------- determinism of the DARE masks

@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_same_seed_and_name_give_identical_results(method):
    deltas = random_deltas(2, (50, 40), seed=5)
    spec = Combination(method, 0.4, seed=7)
    torch.manual_seed(1)
    first = combine_deltas(deltas, [0.7, 0.3], spec, "a.weight")
    # other tensors first, and a different global RNG state: the masks must not care
    combine_deltas(deltas, [0.7, 0.3], spec, "b.weight")
    torch.manual_seed(99)
    torch.rand(1000)
    second = combine_deltas(deltas, [0.7, 0.3], spec, "a.weight")
    assert torch.equal(first, second)


def test_mask_depends_on_seed_name_and_index_only():
    base = dare_keep_mask((64, 64), 0.5, seed=0, tensor_name="x.weight", index=0)
    assert torch.equal(base, dare_keep_mask((64, 64), 0.5, seed=0, tensor_name="x.weight", index=0))
    assert not torch.equal(base, dare_keep_mask((64, 64), 0.5, seed=1, tensor_name="x.weight", index=0))
    assert not torch.equal(base, dare_keep_mask((64, 64), 0.5, seed=0, tensor_name="y.weight", index=0))
    assert not torch.equal(base, dare_keep_mask((64, 64), 0.5, seed=0, tensor_name="x.weight", index=1))
    # a stable hash (sha256), not Python's per-process salted hash()
    digest = hashlib.sha256(b"0:x.weight:0").digest()
    assert mask_seed(0, "x.weight", 0) == int.from_bytes(digest[:8], "little") & (2**63 - 1)


def test_different_seed_gives_a_different_dare_result():
    deltas = random_deltas(2, (50, 40), seed=6)
    a = combine_deltas(deltas, [0.7, 0.3], Combination("dare_linear", 0.5, seed=0), "w")
    b = combine_deltas(deltas, [0.7, 0.3], Combination("dare_linear", 0.5, seed=1), "w")
    assert not torch.equal(a, b)


# ---------------------------------------------------------------- degenerate densities

@pytest.mark.parametrize("method", COMBINE_METHODS)
def test_density_one_single_adapter_is_the_weighted_delta(method):
    (delta,) = random_deltas(1, (33, 21), seed=8)
    out = combine_deltas([delta], [0.7], Combination(method, 1.0), "w")
    assert torch.equal(out, delta * 0.7)


def test_k_zero_prunes_everything():
    deltas = random_deltas(2, (7, 7), seed=9)  # int(0.01 * 49) == 0, as in PEFT
    for method in ("ties", "magnitude_prune"):
        out = combine_deltas(deltas, [0.7, 0.3], Combination(method, 0.01), "w")
        assert torch.count_nonzero(out) == 0


# ---------------------------------------------------------------- input checks

@pytest.mark.parametrize("spec", [
    Combination("foo", 0.5),
    Combination("ties", 0),
    Combination("ties", 0.0),
    Combination("ties", 1.5),
    Combination("dare_ties", -0.1),
    Combination("dare_linear", float("nan")),
    Combination("ties", 0.5, majority_sign_method="median"),
])
def test_check_combine_refuses(spec):
    with pytest.raises(InputError):
        check_combine(spec)
    with pytest.raises(InputError):
        combine_deltas([torch.ones(2)], [1.0], spec, "w")


def test_check_combine_accepts():
    for method in COMBINE_METHODS:
        check_combine(Combination(method, 1.0))
        check_combine(Combination(method, 0.1, seed=3, majority_sign_method="frequency"))
    assert Combination("ties", 0.5).majority_sign_method == "total"


def test_mismatched_shapes_are_an_input_error():
    with pytest.raises(InputError):
        combine_deltas([torch.ones(2, 3), torch.ones(3, 2)], [0.5, 0.5], Combination("ties", 0.5), "w")


# ---------------------------------------------------------------- PEFT's own merge_utils

def _peft_inputs(kind: str):
    if kind == "random":
        return random_deltas(3, (48, 40), seed=10)
    # small integers: many magnitudes tie at the top-k threshold, so PEFT's topk tie choice matters
    gen = torch.Generator().manual_seed(12)
    return [torch.randint(-3, 4, (48, 40), generator=gen).float() * 0.125 for _ in range(3)]  # exact sums


@pytest.mark.parametrize("kind", ["random", "ties_at_threshold"])
@pytest.mark.parametrize("density", [0.2, 0.5, 0.01])
def test_matches_peft_merge_utils(kind, density):
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    deltas = _peft_inputs(kind)
    weights = [0.5, 0.3, 0.2]
    w = torch.tensor(weights, dtype=torch.float32)
    expected = {
        ("magnitude_prune", "total"): merge_utils.magnitude_prune(list(deltas), w, density),
        ("ties", "total"): merge_utils.ties(list(deltas), w, density, majority_sign_method="total"),
        ("ties", "frequency"): merge_utils.ties(list(deltas), w, density, majority_sign_method="frequency"),
    }
    for (method, sign_method), peft_out in expected.items():
        got = combine_deltas(deltas, weights, Combination(method, density, majority_sign_method=sign_method), "w")
        tol = 1e-6 * peft_out.abs() + 1e-12
        assert torch.all((got - peft_out).abs() <= tol), (method, sign_method, kind, density)


@pytest.mark.parametrize("method", COMBINE_METHODS)
def test_a_tensor_one_adapter_touches_is_still_combined_and_weighted(method):
    """The fuse hands even a single ΔW to the combination, so its --weight (and pruning) apply: a
    tensor only one of the adapters updates gets combine([ΔW], [w]), not ΔW."""
    from merge_core.kinds import Kind
    from merge_core.numerics.fuse import fuse_into
    from merge_core.numerics.ops import Term
    from merge_core.numerics.workspace import workspace_for

    torch.manual_seed(0)
    a, b = torch.randn(2, 6), torch.randn(8, 2)
    spec = Combination(method, 0.5, seed=3)
    weight = torch.zeros(8, 6)
    fuse_into(weight, [Term(Kind.LORA, {"A": a, "B": b}, 1.0, weight=0.5)], workspace_for("cpu"),
              Arithmetic(combine=spec), name="w")
    expected = combine_deltas([b @ a], [0.5], spec, "w")
    assert torch.equal(weight, expected) and not torch.equal(weight, b @ a)


def test_combining_layer_and_parameter_lora_of_one_weight_is_refused(tmp_path):
    """PEFT rounds a parameter LoRA's ΔW before adding it and a layer LoRA's not: they cannot be combined."""
    from peft import LoraConfig

    from merge_core.inputs.adapter import load_adapter
    from merge_core.inputs.checkpoint import load_base
    from merge_core.io.local import LocalStorage
    from merge_core.planning.planner import plan_merge
    from tests.reference import make_base
    from tests.variant_reference import build_adapter, causal_lm

    spec = causal_lm()
    base = make_base(str(tmp_path / "base"))
    as_parameter = build_adapter(spec, base, str(tmp_path / "p"), LoraConfig(
        r=2, lora_alpha=4, target_modules=[], target_parameters=["self_attn.q_proj.weight"]))
    as_layer = build_adapter(spec, base, str(tmp_path / "l"), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    adapters = [load_adapter(LocalStorage(a)) for a in (as_parameter, as_layer)]
    with pytest.raises(InputError, match=r"q_proj.weight: is updated both by LoRA on its layer and by LoRA on it as "
                                         r"a parameter.*--combine cannot combine them"):
        plan_merge(load_base(LocalStorage(base)), adapters, [0.5, 0.5], Arithmetic(combine=Combination("ties", 0.5)))
    plan_merge(load_base(LocalStorage(base)), adapters, [0.5, 0.5])  # a weighted sum is fine
