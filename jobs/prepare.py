"""Every input of a merge read and checked, and the plan made: everything that can be refused is
refused here, before anything is written. `plan`, `verify`, a merge and each output of a batch
start from it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from jobs.options import EXECUTORS, MergeInputs
from merge_core.errors import InputError
from merge_core.inputs.adapter import LoraAdapter, load_adapter
from merge_core.inputs.adapter_files import stage_pickled_adapter
from merge_core.inputs.checkpoint import BaseCheckpoint, load_base
from merge_core.io.registry import open_storage
from merge_core.names import ADAPTER_CONFIG_NAME, ADAPTER_PICKLE_NAME, ADAPTER_WEIGHTS_NAME
from merge_core.planning.plan import MergePlan
from merge_core.planning.planner import plan_merge

log = logging.getLogger("lora_merge")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Prepared:
    base: BaseCheckpoint
    adapters: tuple[LoraAdapter, ...]
    weights: tuple[float, ...]
    plan: MergePlan


def check_execution(inputs: MergeInputs) -> None:
    """--device, and (for the commands that run tasks) --executor with it."""
    if inputs.device not in DEVICES:
        raise InputError("--device", f"unknown device {inputs.device!r}", f"use one of {', '.join(DEVICES)}")
    executor = getattr(inputs, "executor", "ray")  # `plan` runs no tasks
    if executor not in EXECUTORS:
        raise InputError("--executor", f"unknown executor {executor!r}", f"use one of {', '.join(EXECUTORS)}")
    if executor == "local" and getattr(inputs, "ray_address", None):
        raise InputError("--executor local", f"runs without Ray, so --ray-address {inputs.ray_address} would go "
                         "unused", "leave out --ray-address, or use --executor ray")
    if executor == "local" and inputs.device == "cuda":
        raise InputError("--device cuda", "--executor local fuses on this machine's CPUs",
                         "use --executor ray to fuse on GPUs, or --device auto or cpu")


def prepare(inputs: MergeInputs, pickle_staging: str | None = None, base: BaseCheckpoint | None = None) -> Prepared:
    """Read and check every input, and plan: everything that can be refused is refused here.
    With pickle_staging (a URI), pickle-only adapters are converted there (--allow-pickle).
    `base`: the base already read (a batch reads it once for all its outputs)."""
    check_execution(inputs)
    if not inputs.adapters:
        raise InputError("--adapter", "no adapter given", "pass at least one --adapter")
    if base is None:
        base = load_base(open_storage(inputs.checkpoint, inputs.storage))
    weights = tuple(inputs.weights) or (1.0,) * len(inputs.adapters)
    adapters = []
    for number, uri in enumerate(inputs.adapters):
        storage = open_storage(uri, inputs.storage)
        if pickle_staging and not storage.exists(ADAPTER_WEIGHTS_NAME) and storage.exists(ADAPTER_PICKLE_NAME):
            staged = open_storage(f"{pickle_staging}/adapter-{number}", inputs.storage)
            stage_pickled_adapter(storage, staged)
            storage = staged
        adapters.append(load_adapter(storage))
    restorable = bool(getattr(inputs, "original_base", None))  # unmerge --base: DoRA and copies restored from it
    plan = plan_merge(base, adapters, weights, inputs.arithmetic, allow_base_mismatch=inputs.allow_base_mismatch,
                      dequantize=inputs.dequantize, restorable=restorable, scales=inputs.scales)
    _warn_surprises(base, adapters, weights)
    return Prepared(base, tuple(adapters), weights, plan)


def _last_part(name: str) -> str:
    return str(name).rstrip("/").rsplit("/", 1)[-1].lower()


def _warn_surprises(base: BaseCheckpoint, adapters, weights) -> None:
    """What is allowed but rarely meant: an adapter weighted 0, an adapter whose config names
    another model than the base (the shapes fit, so nothing else would tell)."""
    base_names = {_last_part(base.uri), _last_part(base.config.get("_name_or_path", "") or "")} - {""}
    for adapter, weight in zip(adapters, weights):
        if weight == 0:
            log.warning("%s has weight 0, so it changes nothing: drop it, or give it another --weight", adapter.uri)
        trained_on = adapter.config.get("base_model_name_or_path")
        if trained_on and _last_part(trained_on) not in base_names:
            log.warning("%s was trained on %r (its %s), and the base is %s: merge it only into that model's weights",
                        adapter.uri, trained_on, ADAPTER_CONFIG_NAME, base.uri)
