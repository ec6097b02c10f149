"""A merged model's history, read from its merge_manifest.json: which adapters it holds now (each
merge adds its adapters, each unmerge takes them out, back through the chain of manifests every
output carries as its `lineage`), so that an adapter is never merged twice by mistake and an
unmerge of one the model never held is noticed.

Adapters are known by the sha256 of their weights file, whatever URI they were given by.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from merge_core.errors import InputError
from merge_core.names import ADAPTER_WEIGHTS_NAME, MANIFEST_NAME

MAX_DEPTH = 64  # a longer chain is not a model's history but a loop someone wrote by hand


@dataclass(frozen=True)
class Merged:
    """One adapter a model holds, and the run that merged it in."""
    sha256: str
    uri: str
    merged_into: str  # the base URI of that merge
    created: str


def weights_sha256(record: Mapping[str, object]) -> str | None:
    """The sha256 of an adapter record's weights file (a manifest's adapters[i])."""
    for file in record.get("files") or ():
        if isinstance(file, Mapping) and file.get("name") == ADAPTER_WEIGHTS_NAME:
            return str(file.get("sha256"))
    return None


def held_adapters(manifest: Mapping[str, object] | None) -> dict[str, Merged]:
    """The adapters a model with this manifest holds, by weights sha256, oldest merge first."""
    chain = []
    while isinstance(manifest, Mapping) and len(chain) < MAX_DEPTH:
        chain.append(manifest)
        manifest = manifest.get("lineage")
    held: dict[str, Merged] = {}
    for entry in reversed(chain):  # the oldest first
        unmerge = (entry.get("arithmetic") or {}).get("operation") == "unmerge"
        base = str((entry.get("base") or {}).get("uri", ""))
        for record in entry.get("adapters") or ():
            sha = weights_sha256(record) if isinstance(record, Mapping) else None
            if sha is None:
                continue
            if unmerge:
                held.pop(sha, None)
            else:
                held[sha] = Merged(sha, str(record.get("given_as") or record.get("uri", "")), base,
                                   str(entry.get("created", "")))
    return held


def check_not_merged_twice(base_uri: str, manifest: Mapping[str, object] | None,
                           records: Sequence[Mapping[str, object]], allow_remerge: bool) -> None:
    """A merge into a lora-merge output of an adapter it already holds is refused (--allow-remerge
    to do it anyway)."""
    if allow_remerge:
        return
    held = held_adapters(manifest)
    for record in records:
        earlier = held.get(weights_sha256(record) or "")
        if earlier is not None:
            raise InputError(str(record.get("given_as") or record.get("uri")),
                             f"is already merged into {base_uri}: its weights are those of {earlier.uri}, merged "
                             f"into {earlier.merged_into} on {earlier.created[:10]} ({base_uri}/{MANIFEST_NAME})",
                             "merge into the original base, or pass --allow-remerge to add it a second time")


def unrecorded(manifest: Mapping[str, object] | None, records: Sequence[Mapping[str, object]]) -> list[str]:
    """The adapters to unmerge that the merged model's manifest does not record as held."""
    if manifest is None:
        return []
    held = held_adapters(manifest)
    return [str(r.get("given_as") or r.get("uri")) for r in records if weights_sha256(r) not in held]
