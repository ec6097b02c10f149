"""Micro-benchmark of the fuse alone, per GB of weights: no I/O, no Ray, no hashing.

    .venv/bin/python -m bench.fuse_micro                 # 1 and 2 threads, 4096×4096 and 14336×4096 bf16, r=16
    .venv/bin/python -m bench.fuse_micro --repeats 9 --threads 1

For each shape and thread count it times, on the same tensors:
  - dense: a bf16 weight merged as a plain LoRA merge fuses it (merge_core.numerics.fuse);
  - fp8: the same weight stored FP8 e4m3 with 128×128 block scales, merged as the worker does
    (merge_core.worker.quantized_tensor.merged_quantized: decode, fuse, encode with fresh scales, measure);
and prints the median seconds per GB of the weight as the base stores it (bf16: 2 bytes an element; the FP8
row is per GB of the same weight in bf16, so that its ratio to the dense fuse compares one model's merges).
The machine may be shared: medians over alternating repeats, and ratios, are what to quote.
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace
from typing import Callable

import torch

from merge_core.format.codecs import fp8_block
from merge_core.format.header import TensorInfo
from merge_core.format.quantization import QuantizedWeight
from merge_core.kinds import Kind
from merge_core.numerics.fuse import fuse_into
from merge_core.numerics.ops import Term
from merge_core.numerics.workspace import workspace_for
from merge_core.planning.plan import FuseTarget, StoredPart, Update
from merge_core.worker.quantized_tensor import merged_quantized

SHAPES = ((4096, 4096), (14336, 4096))
RANK = 16
BLOCK = (128, 128)


def _info(name: str, tensor: torch.Tensor, dtype: str) -> TensorInfo:
    nbytes = tensor.numel() * tensor.element_size()
    return TensorInfo(name=name, dtype=dtype, shape=tuple(tensor.shape), start=0, end=nbytes)


def _bytes(tensor: torch.Tensor) -> bytearray:
    return bytearray(tensor.contiguous().view(torch.uint8).numpy().tobytes())


def fp8_case(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> Callable[[], object]:
    """One FP8 block-scaled weight merged as the worker merges it, from fresh copies of its bytes."""
    codes, scales = fp8_block.quantize(weight.float(), BLOCK, torch.float32)
    infos = (_info("w.weight", codes, "F8_E4M3"), _info("w.weight_scale_inv", scales, "F32"))
    quantized = QuantizedWeight("w.weight", fp8_block.CODEC.name, (("codes", infos[0]), ("scale", infos[1])),
                                tuple(weight.shape), block=BLOCK)
    factors = (_info("a", a, "F32"), _info("b", b, "F32"))
    update = Update(adapter=0, data_start=0, kind=Kind.LORA, factors=factors, roles=("A", "B"), scale=scale)
    parts = tuple(StoredPart(role=role, shard="s", data_start=0, info=info)
                  for role, info in zip(("codes", "scale"), infos))
    target = FuseTarget(tensor="w.weight", updates=(update,), quantized=quantized, parts=parts)
    stored, factor_bytes = (_bytes(codes), _bytes(scales)), (_bytes(a), _bytes(b))
    job = SimpleNamespace(base_uri="bench")  # what merged_quantized reads of the job: where the parts come from
    workspace = workspace_for("cpu")
    term = Term(Kind.LORA, {"A": a, "B": b}, scale)

    def run() -> object:
        parts = [[bytearray(p) for p in stored]]
        return merged_quantized(target, parts, [list(factor_bytes)], job, workspace,
                                lambda w, member, f: fuse_into(w, [term], workspace, name=member.tensor))
    return run


def timed(run: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    workspace = workspace_for("cpu")
    for rows, cols in SHAPES:
        torch.manual_seed(0)
        weight = (torch.randn(rows, cols) * 0.02).to(torch.bfloat16)
        a, b, scale = torch.randn(RANK, cols) * 0.01, torch.randn(rows, RANK) * 0.01, 2.0
        term = Term(Kind.LORA, {"A": a, "B": b}, scale)
        gb = weight.numel() * weight.element_size() / 1e9
        merged = weight.clone()

        def dense() -> object:
            merged.copy_(weight)
            return fuse_into(merged, [term], workspace)

        fp8 = fp8_case(weight, a, b, scale)
        for threads in args.threads:
            torch.set_num_threads(threads)
            runs = {"dense": dense, "fp8 block-scaled": fp8}
            times = {name: [] for name in runs}
            for _ in range(args.repeats):  # alternate, so that a noisy neighbour hurts each alike
                for name, run in runs.items():
                    times[name] += timed(run, 1)
            medians = {name: statistics.median(t) / gb for name, t in times.items()}
            print(f"{rows}×{cols} bf16, r={RANK}, {threads} thread{'s' if threads > 1 else ''}:")
            for name, per_gb in medians.items():
                print(f"  {name:28s} {per_gb:6.3f} s/GB")
            print(f"  fp8 / dense {medians['fp8 block-scaled'] / medians['dense']:.2f}×")


if __name__ == "__main__":
    main()
