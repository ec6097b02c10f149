"""Job specs: `lora-merge merge --config job.yaml` takes every option from a file kept in git.

Keys are the long flags with underscores (`part_size_mb`, `ray_address`, ...), plus `adapters`
as a list of URIs or of {uri, weight}. Flags given on the command line override the file.
Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from typing import Mapping

import yaml

from merge_core.errors import InputError
from merge_core.io.registry import open_storage
from merge_core.io.storage import StorageOptions

# key: (type, what the value must be)
KEYS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "base": (str, "a URI"),
    "adapters": (list, "a list of URIs or of {uri, weight}"),
    "output": (str, "a URI"),
    "device": (str, "auto, cpu or cuda"),
    "sequential": (bool, "true or false"),
    "combine": (str, "ties, dare_linear, dare_ties or magnitude_prune"),
    "density": ((int, float), "a fraction, 0 < density <= 1"),
    "seed": (int, "a whole number"),
    "allow_base_mismatch": (bool, "true or false"),
    "ray_address": (str, "a Ray address"),
    "overwrite": (bool, "true or false"),
    "resume": (bool, "true or false"),
    "allow_nonfinite": (bool, "true or false"),
    "allow_pickle": (bool, "true or false"),
    "validate": (bool, "true or false"),
    "part_size_mb": (int, "a whole number of MiB"),
    "report": (str, "a file path"),
    "task_cpus": (int, "CPUs each shard task asks Ray for"),
    "task_resources": (dict, "extra Ray resources per shard task, name: amount"),
}


def load_job_config(uri: str) -> dict:
    """Read and check a job spec (a local path or s3:// URI); returns argparse-style values."""
    if "/" in uri.rstrip("/"):
        directory, name = uri.rstrip("/").rsplit("/", 1)
    else:
        directory, name = ".", uri
    storage = open_storage(directory, StorageOptions())
    where = storage.describe(name)
    try:
        spec = yaml.safe_load(storage.read_bytes(name).decode("utf-8"))
    except FileNotFoundError:
        raise InputError(where, "file not found", "check the --config path") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(where, f"not valid YAML ({str(exc).splitlines()[0]})", "fix the file") from None
    if not isinstance(spec, dict):
        raise InputError(where, "is not a mapping of option names to values", "see README.md, Job specs")
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise InputError(where, f"unknown key(s) {', '.join(unknown)}", f"known keys: {', '.join(KEYS)}")
    for key, value in spec.items():
        kind, what = KEYS[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise InputError(where, f"{key} is {value!r}, not {what}", f"fix {key}")
    values = {k: v for k, v in spec.items() if k != "adapters"}
    if "adapters" in spec:
        values["adapters"], values["weights"] = _adapters(spec["adapters"], where)
    return values


def _adapters(entries: list, where: str) -> tuple[list[str], list[float]]:
    uris, weights = [], []
    for entry in entries:
        if isinstance(entry, str):
            entry = {"uri": entry}
        if not isinstance(entry, Mapping) or set(entry) - {"uri", "weight"} or not isinstance(entry.get("uri"), str):
            raise InputError(where, f"adapter entry {entry!r} is not a URI or {{uri, weight}}", "fix adapters")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise InputError(where, f"weight {weight!r} of {entry['uri']} is not a number", "fix adapters")
        uris.append(entry["uri"])
        weights.append(float(weight))
    if not uris:
        raise InputError(where, "adapters is empty", "list at least one adapter")
    return uris, weights if any(w != 1.0 for w in weights) else []
