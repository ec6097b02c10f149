"""A base checkpoint as the planner sees it: shards, their headers, and the other files.

Only headers are read here (two small ranged reads per shard), so a 405B checkpoint of
hundreds of shards is described in seconds without touching its weights.
"""

from __future__ import annotations

import bisect
import functools
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Mapping

from merge_core.errors import InputError
from merge_core.format.codecs import CONFIG_FILES, group_weights, read_scheme
from merge_core.format.header import LENGTH_PREFIX_BYTES, ShardHeader, TensorInfo, header_length, parse_header
from merge_core.format.quantization import QuantizedWeight, QuantScheme
from merge_core.inputs.location import not_a_model
from merge_core.io.storage import Storage, check_plain_name
from merge_core.names import (
    CONFIG_JSON,
    INDEX_NAME,
    JOURNAL_NAME,
    MANIFEST_NAME,
    REPORT_NAME,
    SINGLE_NAME,
    WEIGHT_FILE_SUFFIXES,
)

HEADER_READ_THREADS = 16


@dataclass(frozen=True)
class Shard:
    name: str
    header: ShardHeader

    @property
    def size(self) -> int:
        return self.header.file_size


# Input embeddings an output head may be tied to (Llama-style, GPT-2, BLOOM/BERT-style, GPT-NeoX).
TIED_INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


@dataclass(frozen=True, kw_only=True)
class BaseCheckpoint:
    uri: str
    shards: tuple[Shard, ...]
    index_metadata: Mapping[str, object]
    indexed: bool  # False for a single model.safetensors without an index
    extra_files: tuple[str, ...]  # config, tokenizer and other non-weight files, copied as they are
    weight_map: Mapping[str, str] = field(repr=False)
    config: Mapping[str, object] = field(default_factory=dict, repr=False)  # config.json, when it has one
    quantization: QuantScheme | None = None  # config.json's quantization_config (or a file beside it), checked
    # quantized weights by logical name (X.weight, or GPT-OSS's ...experts.gate_up_proj): the
    # stored tensors each is made of (codes and scales), which the planner treats as one
    quantized: Mapping[str, QuantizedWeight] = field(default_factory=dict, repr=False)
    # merge_manifest.json, when the base is itself a lora-merge output: its history (lineage)
    manifest: Mapping[str, object] | None = field(default=None, repr=False)

    @property
    def tied_embedding(self) -> str | None:
        """With tie_word_embeddings, the stored input embedding the output head shares."""
        if not self.config.get("tie_word_embeddings"):
            return None
        found = [n for n in self.weight_map if n.endswith(TIED_INPUT_EMBEDDINGS)]
        return found[0] if len(found) == 1 else None

    def has(self, name: str) -> bool:
        """Whether the model has this tensor: stored as it is, or a quantized weight's logical name."""
        return name in self.quantized or name in self.weight_map

    def shard_of(self, name: str) -> str:
        """The shard holding a tensor; for a quantized weight, the one holding its largest part."""
        weight = self.quantized.get(name)
        return self.weight_map[weight.primary.name if weight else name]

    def info(self, name: str) -> TensorInfo:
        """A tensor as the model holds it: a quantized weight's logical dtype and shape (no offsets)."""
        weight = self.quantized.get(name)
        if weight is not None:
            return TensorInfo(name=name, dtype=weight.dtype, shape=weight.shape, start=0, end=0)
        return self.shard(self.weight_map[name]).header.tensor(name)

    def stored_under(self, module: str) -> list[str]:
        """The stored tensors whose names begin `module.`, in name order (a bisection, not a scan: the
        planner asks once per update of a base that may hold hundreds of thousands of tensors)."""
        names = self._sorted_names
        start = bisect.bisect_left(names, module + ".")
        end = bisect.bisect_left(names, module + "/")  # "/" follows "." in ASCII
        return names[start:end]

    @functools.cached_property
    def _sorted_names(self) -> list[str]:
        return sorted(self.weight_map)

    def part_of(self, stored: str) -> QuantizedWeight | None:
        """The quantized weight a stored tensor (codes, scales, ...) belongs to, if any."""
        return self._parts.get(stored)

    @functools.cached_property
    def _parts(self) -> dict[str, QuantizedWeight]:
        return {name: w for w in self.quantized.values() for name in w.stored_names}

    def shard(self, name: str) -> Shard:
        return self._shards[name]

    @functools.cached_property
    def _shards(self) -> dict[str, Shard]:
        return {shard.name: shard for shard in self.shards}

    @property
    def total_tensor_bytes(self) -> int:
        return sum(t.nbytes for s in self.shards for t in s.header.tensors)


def read_shard_header(storage: Storage, name: str) -> ShardHeader:
    where = storage.describe(name)
    try:
        size = storage.size(name)
    except FileNotFoundError:
        raise InputError(where, "file not found", "check the path, or restore the missing file") from None
    prefix = storage.read_range(name, 0, min(LENGTH_PREFIX_BYTES, size))
    length = header_length(prefix, size, where)
    return parse_header(storage.read_range(name, LENGTH_PREFIX_BYTES, length), size, where)


def read_json(storage: Storage, name: str, fix: str) -> object:
    where = storage.describe(name)
    try:
        return json.loads(storage.read_bytes(name).decode("utf-8"))
    except FileNotFoundError:
        raise InputError(where, "file not found", fix) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(where, f"not valid JSON ({exc})", "repair or regenerate the file") from None


def _read_manifest(storage: Storage) -> dict | None:
    """A base's merge_manifest.json, if it is one lora-merge wrote; anything else is no history."""
    try:
        manifest = json.loads(storage.read_bytes(MANIFEST_NAME).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and "manifest_version" in manifest else None


def _read_index(storage: Storage) -> tuple[dict[str, str], dict]:
    where = storage.describe(INDEX_NAME)
    index = read_json(storage, INDEX_NAME, "save the base with save_pretrained")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(where, "has no weight_map object", "regenerate the index with save_pretrained")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise InputError(where, f"weight_map entry for {tensor} is not a file name", "fix the weight_map")
        check_plain_name(shard, where)
    metadata = index.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise InputError(where, "metadata is not a JSON object", "fix or remove the metadata field")
    return weight_map, metadata


def load_base(storage: Storage) -> BaseCheckpoint:
    names = storage.list_names()
    if INDEX_NAME in names:
        weight_map, metadata = _read_index(storage)
        shard_names = sorted(set(weight_map.values()))
        missing = [n for n in shard_names if n not in names]
        if missing:
            raise InputError(storage.describe(missing[0]),
                             f"listed in {INDEX_NAME} but missing ({len(missing)} shard(s) missing in all)",
                             "restore the missing shards or point --base at a complete checkpoint")
    elif SINGLE_NAME in names:
        weight_map, metadata, shard_names = {}, {}, [SINGLE_NAME]
    else:
        raise not_a_model(storage)

    with ThreadPoolExecutor(min(HEADER_READ_THREADS, len(shard_names))) as pool:
        headers = list(pool.map(lambda n: read_shard_header(storage, n), shard_names))
    shards = tuple(Shard(n, h) for n, h in zip(shard_names, headers))

    if not weight_map:
        weight_map = {t.name: SINGLE_NAME for t in shards[0].header.tensors}
    seen: dict[str, str] = {}
    for shard in shards:
        for info in shard.header.tensors:
            if info.name in seen:
                raise InputError(storage.describe(shard.name), f"tensor {info.name} is also in {seen[info.name]}",
                                 "each tensor must be stored once; re-save the checkpoint")
            seen[info.name] = shard.name
            if weight_map.get(info.name) != shard.name:
                raise InputError(storage.describe(INDEX_NAME),
                                 f"tensor {info.name} is in {shard.name} but the weight_map says "
                                 f"{weight_map.get(info.name)}", "regenerate the index with save_pretrained")
    for tensor, shard_name in weight_map.items():
        if tensor not in seen:
            raise InputError(storage.describe(shard_name), f"tensor {tensor} is in the weight_map but not in the shard",
                             "restore the shard or regenerate the index")

    own = {MANIFEST_NAME, REPORT_NAME, JOURNAL_NAME, *shard_names}
    extra = tuple(n for n in names if not n.endswith(WEIGHT_FILE_SUFFIXES) and n not in own)
    config = read_json(storage, CONFIG_JSON, "restore config.json") if CONFIG_JSON in names else {}
    config = config if isinstance(config, dict) else {}
    beside = {name: (read_json(storage, name, f"restore {name}"), storage.describe(name))
              for name in CONFIG_FILES if name in names}
    scheme = read_scheme(config, storage.describe(CONFIG_JSON), beside)
    quantized = {}
    if scheme is not None:
        infos = {info.name: info for shard in shards for info in shard.header.tensors}
        quantized = group_weights(scheme, infos, storage.uri)
    manifest = _read_manifest(storage) if MANIFEST_NAME in names else None
    return BaseCheckpoint(uri=storage.uri, shards=shards, index_metadata=metadata, indexed=INDEX_NAME in names,
                          extra_files=extra, weight_map=weight_map, config=config, quantization=scheme,
                          quantized=quantized, manifest=manifest if isinstance(manifest, dict) else None)
