"""What the formats' layouts check in config.json and the headers, refused in the same words."""

from __future__ import annotations

from typing import Mapping, Sequence

from merge_core.errors import InputError

UNQUANTIZED_FIX = "merge with an unquantized (bf16) base"
CORRUPT_FIX = "the checkpoint is corrupt or was not written by a supported quantizer; re-download it"


def refusal(where: str, name: str, what: str, fix: str = CORRUPT_FIX) -> InputError:
    return InputError(f"{where}: tensor {name}", what, fix)


def module_names(qc: Mapping, keys: Sequence[str], subject: str) -> tuple[str, ...]:
    """The first of `keys` quantization_config has, as a list of module names."""
    for key in keys:
        value = qc.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InputError(f"{subject}.{key}", f"{value!r} is not a list of module names", "fix config.json")
        return tuple(value)
    return ()


def positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
