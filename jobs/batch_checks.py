"""A batch's own bad input, refused before anything is read or written: no output, an output
without adapters, an output listed twice, two outputs at one place, an output inside the base,
inside another output, or where another output's adapter lies (writing it would change an input
of the batch while the batch reads it)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from jobs.options import BatchOptions, MergeOptions
from merge_core.errors import InputError
from merge_core.io.registry import open_storage

ONE_OUTPUT = "give each output as --output URI followed by its --adapter URI, or as an entry of outputs: in the " \
             "--config file"


def _place(uri: str, options: MergeOptions) -> str:
    """Where a URI leads, as storage names it (a relative path made absolute, no trailing slash)."""
    return open_storage(uri, options.storage).uri.rstrip("/")


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer + "/")


def check_batch(batch: BatchOptions, merges: Sequence[MergeOptions]) -> None:
    """Refuse (InputError) a batch whose outputs cannot all be written as asked."""
    if not batch.checkpoint:
        raise InputError("--base", "is required", "pass --base, or set base in the --config file")
    if not merges:
        raise InputError("lora-merge batch", "no output given", ONE_OUTPUT)
    for merge in merges:
        if not merge.output:
            raise InputError("lora-merge batch", "an output has no URI", ONE_OUTPUT)
        if not merge.adapters:
            raise InputError(merge.output, "no adapter given for this output", "give its --adapter after its --output")
    base = _place(batch.checkpoint, merges[0])
    places = [_place(m.output, m) for m in merges]
    seen: dict[str, MergeOptions] = {}
    for merge, place in zip(merges, places):
        if _within(place, base):
            raise InputError(merge.output, f"lies inside the base {batch.checkpoint}",
                             "choose an output outside --base")
        if place in seen:
            if dataclasses.replace(seen[place], output=place) == dataclasses.replace(merge, output=place):
                raise InputError(merge.output, "is listed twice in the batch, with the same adapters and options",
                                 "drop one of the two")
            raise InputError(merge.output, f"two outputs of the batch are at one URI ({seen[place].output} and "
                             f"{merge.output})", "give each output a place of its own")
        seen[place] = merge
    _check_apart(merges, places)


def _check_apart(merges: Sequence[MergeOptions], places: Sequence[str]) -> None:
    """No output inside another, nor where an adapter of the batch lies (or above it)."""
    adapters = {(_place(a, m), a) for m in merges for a in m.adapters}
    for merge, place in zip(merges, places):
        other = next((p for p in places if p != place and _within(place, p)), None)
        if other is not None:
            raise InputError(merge.output, f"lies inside another output of the batch ({other})",
                             "give each output a place of its own")
        used = next((given for adapter, given in adapters if _within(adapter, place)), None)
        if used is not None:
            raise InputError(merge.output, f"holds an adapter the batch reads ({used})",
                             "choose an output apart from every --adapter")
