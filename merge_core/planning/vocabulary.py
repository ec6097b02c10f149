"""Tied output heads and resized vocabularies: where an update lands when the model's output
head shares its input embedding's tensor, and the vocabulary size a resizing adapter makes.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from merge_core.errors import InputError
from merge_core.inputs.adapter import VOCABULARY_MODULES, ModuleUpdate
from merge_core.inputs.checkpoint import TIED_INPUT_EMBEDDINGS, BaseCheckpoint

# The output head a merge writes when it unties it from the input embedding.
UNTIED_HEAD = "lm_head.weight"


def tied_target(base: BaseCheckpoint, update: ModuleUpdate) -> tuple[ModuleUpdate, str | None]:
    """Where an update lands on a model whose output head is tied to its input embedding (only
    the embedding is stored), as PEFT's merge into the shared tensor does; and, when the update
    creates a tensor the base does not store, the base tensor it starts from.

    A LoRA on the head, or a copy loaded over it (lm_head.base_layer.weight), updates the shared
    embedding: the model stays tied. A trained copy of the head (modules_to_save) is a head of its
    own: PEFT unties the model and saves lm_head.weight beside the unchanged embedding."""
    tied = base.tied_embedding
    if base.has(update.target) or tied is None or update.module.rpartition(".")[2] != "lm_head":
        return update, None
    if update.kind.facts.whole and update.trained_copy:
        return update, tied
    return dataclasses.replace(update, target=tied), None


def resizes(update: ModuleUpdate, shape: tuple[int, ...]) -> bool:
    """Whether an update is an embedding or output head (or its bias) saved with a resized
    vocabulary: PEFT saves the whole (n, H) tensor after resize_token_embeddings(n), and its copy
    replaces the base's."""
    copy = tuple(update.factors[0].shape)
    return (update.kind.facts.whole and update.module.rpartition(".")[2] in VOCABULARY_MODULES
            and len(copy) == len(shape) >= 1 and copy[1:] == tuple(shape[1:]) and copy[0] != shape[0])


def check_vocabulary(base: BaseCheckpoint, shapes: Mapping[str, tuple[int, ...]], added: Mapping[str, str]) -> int:
    """A resized vocabulary resizes every tensor of the old one alike (the input embedding and an
    untied output head): a head left at the old size would get its new rows from whatever
    resize_token_embeddings made at merge time, which no file records. Returns the new size."""
    def base_rows(name: str) -> int:
        stored = added.get(name, name)
        return base.info(stored).shape[0]

    sizes = sorted({shape[0] for shape in shapes.values()})
    if len(sizes) > 1:
        raise InputError(", ".join(sorted(shapes)), f"are resized to different vocabulary sizes {sizes}",
                         "merge adapters made for one vocabulary")
    old_sizes = {base_rows(name) for name in shapes}
    vocabulary = [n for n in base.weight_map if n.endswith(TIED_INPUT_EMBEDDINGS)
                  or n.rpartition(".")[0].rpartition(".")[2] in VOCABULARY_MODULES]
    for name in [*vocabulary, *added]:
        rows = shapes[name][0] if name in shapes else base_rows(name)
        if base_rows(name) in old_sizes and rows != sizes[0]:
            raise InputError(name, f"keeps {rows} rows while the adapter resizes the vocabulary to {sizes[0]}",
                             "save the adapter with save_embedding_layers=True after resize_token_embeddings, so "
                             "that it carries every embedding and output head at the new size")
    return sizes[0]
