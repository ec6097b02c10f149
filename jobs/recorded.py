"""How a merged model was made, as its manifest records it: `verify` and `unmerge` take the
adapters' weights, the arithmetic (--sequential, --combine, --density, --seed) and --scales from there
unless they are given, and say in one line when what is given disagrees with the record."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Collection, Mapping, Sequence

from merge_core.io.registry import open_storage
from merge_core.names import MANIFEST_NAME

log = logging.getLogger("lora_merge")
ARITHMETIC = ("weights", "sequential", "combine", "density", "seed", "scales")
FLAGS = {"weights": "--weight", "sequential": "--sequential", "combine": "--combine", "density": "--density",
         "seed": "--seed", "scales": "--scales"}


def _same_place(uri: str) -> str:
    return open_storage(uri).uri.rstrip("/")


def read_manifest(uri: str) -> dict | None:
    storage = open_storage(uri)
    try:
        return json.loads(storage.read_bytes(MANIFEST_NAME)) if storage.exists(MANIFEST_NAME) else None
    except ValueError:
        return None


def recorded_arithmetic(manifest: Mapping, adapters: Sequence[str]) -> dict | None:
    """The options the manifest records for a merge of exactly these adapters (in any order), or
    None when it records other adapters."""
    records = manifest.get("adapters") or []
    by_place = {}
    for record in records:
        for uri in {record.get("uri"), record.get("given_as")} - {None}:
            by_place[_same_place(uri)] = record
    places = [_same_place(a) for a in adapters]
    if len(records) != len(adapters) or any(p not in by_place for p in places):
        return None
    weights = tuple(float(by_place[p].get("weight", 1.0)) for p in places)
    arithmetic = manifest.get("arithmetic") or {}
    combine = arithmetic.get("combine") or {}
    return {"weights": weights if any(w != 1.0 for w in weights) else (),
            "sequential": arithmetic.get("rounding") == "after each adapter",
            "combine": combine.get("method"), "density": float(combine.get("density", 1.0)),
            "seed": int(combine.get("seed", 0)),
            # merges before --scales made fresh scales, and recorded nothing
            "scales": (manifest.get("requantization") or {}).get("scales", "fresh")}


def _shown(name: str, value) -> str:
    if name == "weights":
        return " ".join(f"{w:g}" for w in value) if value else "1 each"
    return "yes" if value is True else "no" if value is False else str(value if value is not None else "none")


def with_recorded(options, given: Collection[str], model_uri: str):
    """`options` with the recorded arithmetic of the merged model at `model_uri` wherever the
    caller gave none; logs one line naming what was given and differs from the record."""
    manifest = read_manifest(model_uri)
    recorded = recorded_arithmetic(manifest, options.adapters) if manifest else None
    if recorded is None:
        return options
    fields = {f.name for f in dataclasses.fields(options)}
    names = [n for n in ARITHMETIC if n in fields and n in recorded]
    if recorded.get("combine") is None:  # density and seed mean nothing without a method
        names = [n for n in names if n not in ("density", "seed")]
    differing = [n for n in names if n in given and _normal(n, getattr(options, n)) != recorded[n]]
    if differing:
        told = "; ".join(f"{FLAGS[n]} {_shown(n, getattr(options, n))} (recorded: {_shown(n, recorded[n])})"
                         for n in differing)
        log.warning("%s/%s records how the adapters were merged, and the options given differ: %s; using the "
                    "options given", model_uri.rstrip("/"), MANIFEST_NAME, told)
    taken = {n: recorded[n] for n in names if n not in given}
    return dataclasses.replace(options, **taken) if taken else options


def _normal(name: str, value):
    if name == "weights":
        return tuple(float(w) for w in value) if any(float(w) != 1.0 for w in value) else ()
    return value
