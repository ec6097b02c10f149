"""compressed-tensors' quantization_config, read as its QuantizationConfig would and checked: its
config groups (each with `targets`, `weights` args and, in mixed-precision checkpoints, a `format` of its
own), its `ignore` list (kept as written), and the settings that make a checkpoint something other
than compressed weights (a status other than compressed, sparsity, transforms).

Torch-free: the driver reads config.json through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from merge_core.errors import InputError
from merge_core.format.codecs.checks import UNQUANTIZED_FIX, module_names, positive_int
from merge_core.format.quantization import QuantArgs

MIXED = "mixed-precision"
DENSE = "dense"
STRATEGIES = ("tensor", "channel", "group", "tensor_group", "block", "token", "attn_head")


@dataclass(frozen=True)
class ConfigGroup:
    """One config group that quantizes weights."""

    key: str  # its name in config_groups, e.g. group_0
    targets: tuple[str, ...]  # module names, "re:" patterns, or class names such as Linear
    args: QuantArgs
    format: str  # its own, or the checkpoint's


def read_groups(qc: Mapping, subject: str) -> tuple[tuple[ConfigGroup, ...], tuple[str, ...]]:
    """(the groups that quantize weights, the ignore list), or InputError naming the key."""
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise InputError(f"{subject}.quantization_status", f"{status!r}: only compressed checkpoints are "
                         "supported (their weights stored as codes and scales)", UNQUANTIZED_FIX)
    sparsity = qc.get("sparsity_config") or {}
    if not isinstance(sparsity, dict) or sparsity.get("format", DENSE) != DENSE:
        raise InputError(f"{subject}.sparsity_config.format", f"sparse format {sparsity.get('format')!r} is not "
                         "supported", UNQUANTIZED_FIX)
    if qc.get("transform_config"):  # rotated weights (SpinQuant, QuIP): an adapter's ΔW is not rotated
        raise InputError(f"{subject}.transform_config", "the weights are stored rotated by transforms, which an "
                         "adapter's update is not", UNQUANTIZED_FIX)
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise InputError(f"{subject}.config_groups", "is missing or empty", "fix config.json")
    read = [_group(key, group, qc.get("format"), f"{subject}.config_groups.{key}") for key, group in groups.items()]
    found = tuple(group for group in read if group is not None)
    if not found:
        raise InputError(f"{subject}.config_groups", "no group quantizes weights", UNQUANTIZED_FIX)
    return found, module_names(qc, ("ignore",), subject)


def _group(key: str, group: object, checkpoint_format: object, subject: str) -> ConfigGroup | None:
    if not isinstance(group, dict):
        raise InputError(subject, f"{group!r} is not a JSON object", "fix config.json")
    weights = group.get("weights")
    if weights is None:  # activations (or a KV cache) only
        return None
    targets = group.get("targets")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise InputError(f"{subject}.targets", f"{targets!r} is not a list of module names, patterns or classes",
                         "fix config.json")
    fmt = group.get("format") or checkpoint_format
    if not isinstance(fmt, str) or fmt in (MIXED, DENSE):
        raise InputError(f"{subject}.format", f"{fmt!r}: a group that quantizes weights needs its compression "
                         "format (mixed-precision checkpoints name one per group)", "fix config.json")
    return ConfigGroup(key, tuple(targets), read_args(weights, f"{subject}.weights"), fmt)


def read_args(weights: object, subject: str) -> QuantArgs:
    """A group's `weights`, as QuantizationArgs validates them (strategy inferred from group_size)."""
    if not isinstance(weights, dict):
        raise InputError(subject, f"{weights!r} is not a JSON object", "fix config.json")
    bits, kind = weights.get("num_bits", 8), weights.get("type", "int")
    if not positive_int(bits):
        raise InputError(f"{subject}.num_bits", f"{bits!r} is not a positive whole number", "fix config.json")
    if kind not in ("int", "float"):
        raise InputError(f"{subject}.type", f"{kind!r} is neither int nor float", "fix config.json")
    group_size = weights.get("group_size")
    strategy = weights.get("strategy") or ("tensor" if group_size is None else "channel" if group_size == -1
                                           else "group")
    if strategy not in STRATEGIES:
        raise InputError(f"{subject}.strategy", f"{strategy!r} is not a compressed-tensors strategy", "fix config.json")
    if strategy in ("token", "attn_head") or weights.get("dynamic") not in (False, None):
        raise InputError(f"{subject}.strategy" if strategy in ("token", "attn_head") else f"{subject}.dynamic",
                         f"{strategy if strategy in ('token', 'attn_head') else weights.get('dynamic')!r}: weights "
                         "quantized on the fly have no stored scales to merge into", UNQUANTIZED_FIX)
    if strategy in ("group", "tensor_group") and not positive_int(group_size):
        raise InputError(f"{subject}.group_size", f"{group_size!r}: strategy {strategy} needs a positive group size",
                         "write the group size the scales were made with")
    block = weights.get("block_structure")
    if strategy == "block" and not (isinstance(block, list) and len(block) == 2 and all(map(positive_int, block))):
        raise InputError(f"{subject}.block_structure", f"{block!r}: strategy block needs [rows, columns]",
                         "write the block size the scales were made with, e.g. [128, 128]")
    symmetric = weights.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise InputError(f"{subject}.symmetric", f"{symmetric!r} is not true or false", "fix config.json")
    scale_dtype = weights.get("scale_dtype")
    return QuantArgs(bits, kind, strategy, symmetric=symmetric,
                     group_size=group_size if strategy in ("group", "tensor_group") else None,
                     block=tuple(block) if strategy == "block" else None,
                     scale_dtype=scale_dtype.removeprefix("torch.") if isinstance(scale_dtype, str) else None)
