"""Checking a merged checkpoint against its base and adapters.

Two depths. `check_merge` runs in the final task before the index is written: headers, the
index, and a numeric spot check that recomputes sampled rows in float64 (workers have already
read their published bytes back against their sha256, and checked for NaN/Inf). `verify_shard`
is the full check behind `lora-merge verify`: every byte of a merged shard is re-read, hashed
against the manifest, and compared tensor by tensor with a fresh merge of the base.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from functools import partial
from typing import Mapping, Sequence

import torch

from merge_core.errors import InputError
from merge_core.format.header import ShardHeader, TensorInfo
from merge_core.format.tensors import TORCH_DTYPES, resized, tensor_from_bytes
from merge_core.inputs.checkpoint import read_shard_header
from merge_core.io.pipeline import Item, Read, read_ahead
from merge_core.io.storage import Storage
from merge_core.names import ADAPTER_WEIGHTS_NAME, CONFIG_JSON
from merge_core.numerics.combine import CombineSpec, combine_deltas
from merge_core.numerics.fuse import fuse
from merge_core.planning.plan import FuseTarget, MergePlan, ShardTask, Update
from merge_core.worker.shard_merge import update_terms

SPOT_TENSORS = 8
SPOT_ROWS = 4
_SIGNED = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of their (shared) float dtype lie between a and b."""
    width = a.element_size()
    va, vb = (t.contiguous().view(_SIGNED[width]).to(torch.int64) for t in (a, b))
    magnitude = (1 << (8 * width - 1)) - 1
    # Floats are sign-magnitude: map them onto a line where adjacent values differ by one.
    oa, ob = (torch.where(v < 0, -(v & magnitude), v) for v in (va, vb))
    return (oa - ob).abs()


def describe_difference(name: str, stored: torch.Tensor, expected: torch.Tensor, max_ulps: int = 0) -> str | None:
    """None when bit-identical (or, with max_ulps, no element further apart), else how far apart they are."""
    s, e = stored.reshape(-1), expected.reshape(-1)
    if torch.equal(s.view(torch.uint8), e.view(torch.uint8)) if s.numel() else True:
        return None
    if not s.is_floating_point():
        return f"tensor {name}: {int((s != e).sum())} of {s.numel()} elements differ"
    ulps = ulp_distance(s, e)
    if max_ulps and int(ulps.max()) <= max_ulps:
        return None
    differing = int((ulps > 0).sum())
    abs_diff = (s.double() - e.double()).abs().nan_to_num(float("inf")).max().item()
    return (f"tensor {name}: {differing} of {s.numel()} elements differ, max {int(ulps.max())} ulp, "
            f"max |difference| {abs_diff:.3g}")


def check_headers(plan: MergePlan, output: Storage) -> tuple[list[str], dict[str, ShardHeader]]:
    """Every base tensor is in the output shard of the same name, with its dtype and shape (a
    resized vocabulary's new shape), and so is every tensor the merge adds; nothing else is."""
    problems, headers = [], {}
    for task in plan.tasks:
        try:
            header = headers[task.name] = read_shard_header(output, task.output_name)
        except InputError as exc:
            problems.append(str(exc))
            continue
        stored = {t.name: (t.dtype, t.shape) for t in header.tensors}
        expected = task.output_tensors
        for name, dtype, shape in expected:
            if stored.get(name) != (dtype, tuple(shape)):
                found = stored.get(name)
                problems.append(f"{output.describe(task.output_name)}: tensor {name} should be "
                                f"{dtype}{list(shape)}, found {'nothing' if found is None else found}")
        extra = sorted(set(stored) - {name for name, _, _ in expected})
        if extra:
            problems.append(f"{output.describe(task.output_name)}: unexpected tensors {extra[:5]}")
    return problems, headers


def check_index(plan: MergePlan, index: Mapping[str, object], headers: Mapping[str, ShardHeader]) -> list[str]:
    expected_map = {name: t.name for t in plan.tasks for name, _, _ in t.output_tensors}
    problems = []
    if index.get("weight_map") != expected_map:
        problems.append("model.safetensors.index.json: weight_map differs from the planned one")
    total = sum(t.nbytes for h in headers.values() for t in h.tensors)
    if index.get("metadata", {}).get("total_size") != total:
        problems.append(f"model.safetensors.index.json: total_size {index.get('metadata', {}).get('total_size')} "
                        f"but the shards hold {total} tensor bytes")
    return problems


def check_config(plan: MergePlan, output: Storage) -> list[str]:
    """config.json says what the merge changed: a resized vocabulary's vocab_size, an untied head's
    tie_word_embeddings."""
    if not plan.config_updates:
        return []
    where = output.describe(CONFIG_JSON)
    try:
        config = json.loads(output.read_bytes(CONFIG_JSON))
    except (FileNotFoundError, ValueError):
        return [f"{where}: missing or not JSON, but the merge changes {sorted(plan.config_updates)}"]
    return [f"{where}: {key} is {config.get(key)!r}, the merge makes it {value!r}"
            for key, value in plan.config_updates.items() if config.get(key) != value]


def _row(storage: Storage, name: str, data_start: int, info: TensorInfo, row: int) -> torch.Tensor:
    row_bytes = info.nbytes // info.shape[0]
    raw = storage.read_range(name, data_start + info.start + row * row_bytes, row_bytes)
    return tensor_from_bytes(raw, info.dtype, info.shape[1:])


def _spot_row(task: ShardTask, target: FuseTarget, row: int, base: Storage, adapters: Sequence[Storage],
              output: Storage, out_header: ShardHeader, sequential: bool = False) -> str | None:
    info = task.shard.header.tensor(target.tensor)
    weight = _row(base, task.name, task.shard.header.data_start, info, row).double()
    exact, bound = weight.clone(), weight.abs()
    rounded_delta = torch.zeros_like(exact)  # |ΔW| PEFT rounds to the weight's dtype before adding it
    for u in target.updates:
        adapter = adapters[u.adapter]
        scale = u.scale * u.weight
        if u.kind == "bias":  # element `row` of lora_B's bias, scaled
            b_elem = _row(adapter, ADAPTER_WEIGHTS_NAME, u.data_start, u.factors[0], row).double()
            exact += b_elem * scale
            bound += b_elem.abs() * abs(scale)
            continue
        a_info, b_info = u.factors[u.roles.index("A")], u.factors[u.roles.index("B")]
        a = tensor_from_bytes(adapter.read_range(ADAPTER_WEIGHTS_NAME, u.data_start + a_info.start, a_info.nbytes),
                              a_info.dtype, a_info.shape).double()
        if u.transpose:  # row `row` of (B @ A)ᵀ is B @ A[:, row]
            b = tensor_from_bytes(adapter.read_range(ADAPTER_WEIGHTS_NAME, u.data_start + b_info.start, b_info.nbytes),
                                  b_info.dtype, b_info.shape).double()
            left, right = a[:, row], b.T
        else:
            left, right = _row(adapter, ADAPTER_WEIGHTS_NAME, u.data_start, b_info, row).double(), a
            if len(u.experts) == 2:  # one expert's share: its r columns of the row's (r, E) layout
                left = left.reshape(-1, u.experts[0])[:, u.experts[1]]
        term = (left @ right) * scale
        exact += term
        bound += (left.abs() @ right.abs()) * abs(scale)
        if u.kind == "param":
            rounded_delta += term.abs()
    stored = _row(output, task.output_name, out_header.data_start, out_header.tensor(target.tensor), row)
    ulps = ulp_distance(stored, exact.to(TORCH_DTYPES[info.dtype]))
    # The merge evaluates W + Σ scale·(B·A) in float32, then rounds once. Evaluating a rank-r sum
    # in float32 may err by about r·eps32·Σ|terms|, which matters where W and ΔW nearly cancel;
    # rounding then adds up to one unit of the stored value. Within that, the merge was right.
    # LoRA on parameters rounds ΔW first, which may move it by half a unit of ΔW itself.
    rank = max(u.factors[0].shape[0] if u.kind in ("lora", "param") else 1 for u in target.updates)
    finfo = torch.finfo(stored.dtype)
    magnitude = stored.double().abs()
    unit = torch.where(magnitude > 0, 2.0 ** torch.floor(torch.log2(magnitude.clamp_min(finfo.tiny))) * finfo.eps,
                       torch.full_like(magnitude, finfo.tiny))
    allowed = unit + 4 * (rank + 2) * torch.finfo(torch.float32).eps * bound + finfo.eps * rounded_delta
    if sequential:  # each adapter's result rounded, by up to half a unit of that intermediate value
        allowed += (len(target.updates) - 1) * finfo.eps * bound
    bad = (ulps > len(target.updates)) & ~((stored.double() - exact).abs() <= len(target.updates) * allowed)
    if bool(bad.any()):
        return (f"{output.describe(task.output_name)}: tensor {target.tensor} row {row}: {int(bad.sum())} elements differ "
                f"from the float64 recomputation by up to {int(ulps.max())} ulp")
    return None


def _row_recomputable(update: Update) -> bool:
    """Kinds whose row the spot check recomputes: LoRA on linear layers, lora_bias, and LoRA on
    2-D parameters or on one expert's tensor."""
    if update.kind == "bias":
        return True
    if update.kind == "param":
        return len(update.experts) == 2 or update.experts == (1,)
    return update.kind == "lora" and len(update.factors[0].shape) == 2


def spot_check(plan: MergePlan, base: Storage, adapters: Sequence[Storage], output: Storage,
               headers: Mapping[str, ShardHeader], seed: int = 0) -> list[str]:
    """Recompute sampled rows of sampled fused tensors in float64 and compare with what was stored.
    Tensors updated by LoRA on linear layers, lora_bias and LoRA on 2-D parameters or experts
    stored one by one are sampled: the other kinds are
    checked against a fresh merge by `lora-merge verify`, and so are merges with --combine, whose
    pruning the float64 row recomputation does not repeat."""
    if plan.combine is not None:
        return []
    rng = random.Random(seed)
    fused = [(t, f) for t in plan.tasks for f in t.targets if t.name in headers and f.updates
             and all(_row_recomputable(u) for u in f.updates)]
    problems = []
    for task, target in rng.sample(fused, min(SPOT_TENSORS, len(fused))):
        rows = task.shard.header.tensor(target.tensor).shape[0]
        for row in rng.sample(range(rows), min(SPOT_ROWS, rows)):
            problem = _spot_row(task, target, row, base, adapters, output, headers[task.name], plan.sequential)
            if problem:
                problems.append(problem)
    return problems


@dataclass(frozen=True)
class ShardVerdict:
    name: str
    problems: tuple[str, ...]
    sha256: str
    size: int
    tensors_checked: int


def verify_shard(task: ShardTask, base: Storage, adapters: Sequence[Storage], merged: Storage,
                 expected_size: int | None, expected_sha256: str | None, fused_ulps: int = 0,
                 sequential: bool = False, combine: CombineSpec | None = None) -> ShardVerdict:
    """Re-read every byte of one merged shard and compare it with a fresh merge of the base shard
    (on this CPU). Fused tensors may differ by `fused_ulps` (1 for shards fused on a GPU, whose
    products sum in another order); untouched tensors and the sha256 must match exactly."""
    where = merged.describe(task.name)
    try:
        header = read_shard_header(merged, task.name)
    except (InputError, FileNotFoundError) as exc:
        return ShardVerdict(task.name, (str(exc),), "", 0, 0)
    problems = []
    digest = hashlib.sha256(merged.read_range(task.name, 0, header.data_start))
    base_header = task.shard.header
    targets = {t.tensor: t for t in task.targets}
    planned = {name: (dtype, tuple(shape)) for name, dtype, shape in task.output_tensors}
    items = []
    for info in header.tensors:  # in the merged file's order, so its bytes hash in sequence
        reads = [Read(merged, task.name, header.data_start + info.start, info.nbytes)]
        target = targets.get(info.name)
        if info.name not in planned:
            problems.append(f"{where}: tensor {info.name} is neither in the base shard nor added by the merge")
            items.append(Item((info, None), tuple(reads)))
            continue
        base_info = base_header.tensor(target.base_tensor if target else info.name)
        reads.append(Read(base, task.name, base_header.data_start + base_info.start, base_info.nbytes))
        if target:
            reads += [Read(adapters[u.adapter], ADAPTER_WEIGHTS_NAME, u.data_start + f.start, f.nbytes)
                      for u in target.updates for f in u.factors]
        items.append(Item((info, base_info), tuple(reads)))
    checked = 0
    for (info, base_info), data in read_ahead(items):
        digest.update(data[0])
        if base_info is None:
            continue
        dtype, shape = planned[info.name]
        if (info.dtype, tuple(info.shape)) != (dtype, shape):
            problems.append(f"{where}: tensor {info.name} is {info.dtype}{list(info.shape)}, "
                            f"the merge makes it {dtype}{list(shape)}")
            continue
        stored = tensor_from_bytes(data[0], info.dtype, info.shape)
        expected = tensor_from_bytes(data[1], base_info.dtype, base_info.shape)
        target = targets.get(info.name)
        if target and target.shape is not None:
            expected = resized(expected, target.shape)[1]
        if target:
            combiner = None if combine is None else partial(
                combine_deltas, weights=[u.weight for u in target.updates], spec=combine, tensor_name=target.tensor)
            expected = fuse(expected, update_terms(target, data[2:], combine is not None), sequential=sequential,
                            combine=combiner)[0]
        difference = describe_difference(info.name, stored, expected, fused_ulps if target else 0)
        if difference:
            problems.append(f"{where}: {difference}")
        checked += 1
    missing = sorted(set(planned) - set(header.names))
    if missing:
        problems.append(f"{where}: {len(missing)} tensors missing, e.g. {missing[:3]}")
    size = merged.size(task.name)
    sha = digest.hexdigest()
    if expected_sha256 is not None and (sha != expected_sha256 or size != expected_size):
        problems.append(f"{where}: sha256 {sha} ({size} bytes) differs from the manifest's {expected_sha256} "
                        f"({expected_size} bytes)")
    return ShardVerdict(task.name, tuple(problems), sha, size, checked)

