"""Fused siblings: the layers vLLM loads as one packed weight (q/k/v as qkv_proj, gate/up as gate_up_proj,
an expert's w1/w3, MLA's q_a_proj with kv_a_proj_with_mqa), which llm-compressor quantizes with one
tensor-level scale (its FUSED_MODULE_MAPPINGS: vLLM takes one global scale for them and only warns when
they differ). A mapping applies to a parent module when its required layers are all there; present
optional ones join; larger groups first, each layer in one group.
"""

from __future__ import annotations

from typing import Iterable

# (required, optional) layer names under one parent
MAPPINGS = ((("q_proj", "k_proj"), ("v_proj",)), (("gate_proj", "up_proj"), ()), (("w1", "w3"), ()),
            (("q_a_proj", "kv_a_proj_with_mqa"), ()))
WEIGHT = ".weight"


def sibling_groups(names: Iterable[str]) -> list[tuple[str, ...]]:
    """Groups of logical weight names (`P.q_proj.weight`, ...) that are fused siblings, each in the
    mapping's order."""
    layers: dict[str, dict[str, str]] = {}
    for name in names:
        if name.endswith(WEIGHT) and "." in name[: -len(WEIGHT)]:
            parent, layer = name[: -len(WEIGHT)].rsplit(".", 1)
            layers.setdefault(parent, {})[layer] = name
    groups = []
    for parent, present in sorted(layers.items()):
        candidates = [tuple(present[n] for n in (*required, *optional) if n in present)
                      for required, optional in MAPPINGS if all(n in present for n in required)]
        claimed: set[str] = set()
        for group in sorted(candidates, key=len, reverse=True):
            if claimed.isdisjoint(group):
                claimed.update(group)
                groups.append(group)
    return groups
