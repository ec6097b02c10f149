"""Job specs: `lora-merge merge --config job.yaml` takes every option from a file kept in git.

Keys are the long flags with underscores (`part_size_mb`, `ray_address`, ...), plus `adapters`
as a list of URIs or of {uri, weight}. Flags given on the command line override the file.
Unknown keys are errors, so a typo never silently falls back to a default. A relative path in the
file is relative to the file's own folder (so a spec kept in git beside its models means the same
wherever it is run from, a Ray job's temporary working directory included). A batch's spec
(`lora-merge batch --config`) lists its outputs under `outputs`, each a mapping of that output's
own options (output, adapters, combine, dequantize, ...); the keys at the top are the whole job's,
and an output's option there applies to every output.
"""

from __future__ import annotations

import os
from typing import Mapping

import yaml

from jobs.options import MergeOptions, output_keys, spec_keys
from merge_core.errors import InputError
from merge_core.io.registry import open_storage, scheme_of

# The keys whose values are locations: relative ones are taken from the spec's folder.
LOCATION_KEYS = ("base", "output", "original", "merged", "report", "report_png")


def load_job_config(uri: str, keys: Mapping[str, tuple] | None = None) -> dict:
    """Read and check a job spec (a local path or s3:// URI) against `keys` (name → (type, what
    the value must be); by default merge's, jobs.options.spec_keys(MergeOptions)); returns option
    values."""
    keys = spec_keys(MergeOptions) if keys is None else keys
    if "/" in uri.rstrip("/"):
        directory, name = uri.rstrip("/").rsplit("/", 1)
    else:
        directory, name = ".", uri
    storage = open_storage(directory)
    where = storage.describe(name)
    try:
        spec = yaml.safe_load(storage.read_bytes(name).decode("utf-8"))
    except FileNotFoundError:
        raise InputError(where, "file not found", "check the --config path") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(where, f"not valid YAML ({str(exc).splitlines()[0]})", "fix the file") from None
    if not isinstance(spec, dict):
        raise InputError(where, "is not a mapping of option names to values", "see README.md, Job specs")
    folder = storage.uri.rstrip("/")
    values = _checked(spec, keys, where, folder)
    if "outputs" in values:  # a batch: each output's own options
        values["outputs"] = [_output(entry, output_keys(), where, folder) for entry in values["outputs"]]
    return values


def _checked(spec: Mapping, keys: Mapping[str, tuple], where: str, folder: str) -> dict:
    """The spec's values: every key known and of its type, adapters as URIs and weights, relative
    locations taken from the spec's folder."""
    unknown = sorted(set(spec) - set(keys))
    if unknown:
        raise InputError(where, f"unknown key(s) {', '.join(unknown)}", f"known keys: {', '.join(keys)}")
    for key, value in spec.items():
        kind, what = keys[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise InputError(where, f"{key} is {value!r}, not {what}", f"fix {key}")
    values = {k: v for k, v in spec.items() if k != "adapters"}
    if "adapters" in spec:
        values["adapters"], values["weights"] = _adapters(spec["adapters"], where)
    for key in LOCATION_KEYS:
        if isinstance(values.get(key), str):
            values[key] = beside(folder, values[key])
    if "adapters" in values:
        values["adapters"] = [beside(folder, uri) for uri in values["adapters"]]
    return values


def _output(entry, keys: Mapping[str, tuple], where: str, folder: str) -> dict:
    """One entry of a batch's `outputs`: a mapping of that output's options, its output and adapters
    among them."""
    if not isinstance(entry, Mapping):
        raise InputError(where, f"output entry {entry!r} is not a mapping of an output's options",
                         "give each output as {output: URI, adapters: [...], ...}")
    named = f"{where} (output {entry.get('output', '?')})"
    values = _checked(entry, keys, named, folder)
    for needed in ("output", "adapters"):
        if needed not in values:
            raise InputError(named, f"the output has no {needed}", f"give it {needed}")
    return values


def beside(folder: str, location: str) -> str:
    """`location` as written in a spec kept in `folder`: an absolute path or a URI as it is, a
    relative path from the folder."""
    if scheme_of(location) or location.startswith(("/", "~")):
        return location
    if scheme_of(folder):
        return f"{folder}/{location}"
    return os.path.normpath(os.path.join(folder, location))


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
