"""lora-merge's own merge without Ray: the product's driver, shard tasks and final task, run in
this process by the in-process executor, as the tests of the numerics compare it with PEFT."""

from __future__ import annotations

import torch

from jobs.api import options_for
from jobs.driver import run_merge
from jobs.executor import InProcessExecutor
from jobs.options import MergeOptions, UnmergeOptions
from tests.reference import load_checkpoint


def merge_without_ray(base: str, adapters: list[str], out: str, weights: list[float] | None = None,
                      unmerge: bool = False, **options) -> dict[str, torch.Tensor]:
    """A whole merge (validation, manifest, report and index included) with the command's options
    (`sequential`, `combine`, `dequantize`, ...; with `unmerge`, `base` is the merged model and
    `original` the original base an unmerge restores DoRA and copies from); returns its tensors."""
    kind = UnmergeOptions if unmerge else MergeOptions
    run_merge(options_for(kind, base=base, adapters=adapters, output=out, weights=weights or (), **options),
              InProcessExecutor())
    return load_checkpoint(out)
