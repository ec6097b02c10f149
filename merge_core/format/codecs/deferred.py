"""torch, and the dtype table over it, imported when a codec first computes: the formats' layouts
(config.json, the headers) live in the same files and serve the driver, which plans from headers
alone and never loads torch."""

from __future__ import annotations

import importlib


class Deferred:
    """A module, imported on the first attribute read from it."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str):
        return getattr(importlib.import_module(self._name), attribute)


torch = Deferred("torch")
tensors = Deferred("merge_core.format.tensors")
