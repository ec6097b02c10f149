"""PEFT LoRA adapters: config, scales, and the exact pairing of saved keys to base tensors.

A saved key looks like `base_model.model.<module>.lora_A.weight`. We parse the suffix rather
than searching for "lora" in the key, and every tensor in the file must be accounted for:
one we cannot place is an error, never silently dropped.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from safetensors.torch import save as save_safetensors

from merge_core.checkpoint import read_json, read_shard_header
from merge_core.errors import InputError
from merge_core.fuse import tensor_from_bytes
from merge_core.pipeline import Item, Read, read_ahead
from merge_core.safetensors_format import FLOAT_DTYPES, ShardHeader, TensorInfo
from merge_core.storage import Storage

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
SUPPORTED_PEFT_TYPES = ("LORA",)
REQUIRED_FIELDS = ("peft_type", "r", "lora_alpha")
# Config switches that change what a merge computes. Until lora-merge implements one, an
# adapter that sets it is refused by name rather than merged as if it were plain LoRA.
UNSUPPORTED_SWITCHES = (
    "use_dora", "use_qalora", "use_bdlora", "arrow_config",
    "alora_invocation_tokens", "velora_config", "monteclora_config", "kasa_config", "layer_replication",
    "trainable_token_indices", "target_parameters", "modules_to_save",
)
# Saved-key suffixes of LoRA tensor kinds that lora-merge does not merge yet.
UNSUPPORTED_SUFFIXES = {
    ".lora_embedding_A": "embedding LoRA",
    ".lora_embedding_B": "embedding LoRA",
    ".lora_magnitude_vector": "DoRA",
    ".lora_magnitude_vector.weight": "DoRA",
}
# init_lora_weights values whose initialisation rewrites the base weight (W_res = W - B₀A₀, or a
# quantisation residual). PEFT redoes that on load, so its merge is right; adding B·A to the
# untouched base would not be. Adapters converted on save (path_initial_model_for_weight_conversion)
# say init_lora_weights=true and merge as plain LoRA.
BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
_PAIR_SUFFIX = re.compile(r"^(?P<module>.+)\.lora_(?P<side>A\.weight|B\.weight|B\.bias)$")


@dataclass(frozen=True)
class LoraPair:
    """One low-rank update: target += scale * B @ A."""
    module: str
    target: str  # the base tensor it updates
    a: TensorInfo
    b: TensorInfo
    rank: int
    scale: float
    transpose: bool = False  # fan_in_fan_out: ΔW is (B @ A)ᵀ
    bias: TensorInfo | None = None  # lora_bias: lora_B's bias, added (scaled) to the base bias

    @property
    def delta_shape(self) -> tuple[int, int]:
        out_in = (self.b.shape[0], self.a.shape[1])
        return out_in[::-1] if self.transpose else out_in


@dataclass(frozen=True)
class LoraAdapter:
    uri: str
    config: Mapping[str, object]
    header: ShardHeader
    pairs: tuple[LoraPair, ...]


def pattern_key(pattern_keys: Sequence[str], module: str) -> str | None:
    """The rank_pattern/alpha_pattern key that applies to a module, matched as PEFT matches it:
    the key, as a regex, must match the whole module name or a dotted suffix of it; first wins."""
    for key in pattern_keys:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error as exc:
            raise InputError(CONFIG_NAME, f"pattern {key!r} in rank_pattern/alpha_pattern is not a valid regular "
                             f"expression ({exc})", "fix the pattern") from None
    return None


def lora_scale(config: Mapping[str, object], module: str) -> tuple[int, float]:
    """(rank, scale) for one module, as PEFT's LoraLayer.update_layer computes them."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r_key = pattern_key(list(rank_pattern), module)
    alpha_key = pattern_key(list(alpha_pattern), module)
    rank = rank_pattern[r_key] if r_key is not None else config["r"]
    alpha = alpha_pattern[alpha_key] if alpha_key is not None else config["lora_alpha"]
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return int(rank), scale


def _check_config(config: object, where: str) -> Mapping[str, object]:
    if not isinstance(config, dict):
        raise InputError(where, "is not a JSON object", "regenerate it with PEFT's save_pretrained")
    missing = [f for f in REQUIRED_FIELDS if f not in config]
    if missing:
        raise InputError(where, f"lacks required field(s) {', '.join(missing)}",
                         "regenerate it with PEFT's save_pretrained")
    if config["peft_type"] not in SUPPORTED_PEFT_TYPES:
        raise InputError(where, f"peft_type {config['peft_type']!r} is not supported",
                         f"supported: {', '.join(SUPPORTED_PEFT_TYPES)}")
    for name in ("r", "lora_alpha"):
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise InputError(where, f"{name} is {value!r}, not a positive number", f"set {name} to a positive number")
    for pattern_name in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(pattern_name) or {}
        if not isinstance(pattern, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in pattern.values()):
            raise InputError(where, f"{pattern_name} is not a map of module patterns to positive numbers",
                             f"fix {pattern_name}")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise InputError(where, f"init_lora_weights {init!r} rewrites the base weights when the adapter loads, so "
                         "B·A alone is not the update", "save the adapter with path_initial_model_for_weight_"
                         "conversion (PEFT converts it to plain LoRA), then merge that")
    enabled = [s for s in UNSUPPORTED_SWITCHES if config.get(s)]
    if enabled:
        raise InputError(where, f"uses {', '.join(enabled)}, which lora-merge does not merge yet",
                         "merge this adapter with PEFT's merge_and_unload for now")
    return config


def _pair_keys(header: ShardHeader, where: str) -> dict[str, dict[str, TensorInfo]]:
    modules: dict[str, dict[str, TensorInfo]] = {}
    for info in header.tensors:
        key = info.name
        if not key.startswith(KEY_PREFIX):
            raise InputError(f"{where}: tensor {key}", f"key does not start with {KEY_PREFIX!r}",
                             "this is not a PEFT adapter file; save the adapter with PEFT's save_pretrained")
        for suffix, kind in UNSUPPORTED_SUFFIXES.items():
            if key.endswith(suffix):
                raise InputError(f"{where}: tensor {key}", f"{kind} tensors are not merged by lora-merge yet",
                                 "merge this adapter with PEFT's merge_and_unload for now")
        match = _PAIR_SUFFIX.match(key[len(KEY_PREFIX):])
        if not match:
            raise InputError(f"{where}: tensor {key}", "is not a LoRA lora_A/lora_B weight",
                             "remove it from the adapter or re-save the adapter with PEFT")
        dims = 1 if match["side"] == "B.bias" else 2
        if info.dtype not in FLOAT_DTYPES or len(info.shape) != dims:
            raise InputError(f"{where}: tensor {key}", f"is {info.dtype}{list(info.shape)}, not a {dims}-D float "
                             "tensor", "re-save the adapter with PEFT")
        modules.setdefault(match["module"], {})[match["side"][0] if dims == 2 else "bias"] = info
    return modules


def scan_adapter(storage: Storage, adapter: LoraAdapter) -> str:
    """Read the adapter's weights once, in order: every tensor must be finite. Returns the file's sha256."""
    header = adapter.header
    items = [Item(None, (Read(storage, WEIGHTS_NAME, 0, header.data_start),))]
    items += [Item(info, (Read(storage, WEIGHTS_NAME, header.data_start + info.start, info.nbytes),))
              for info in header.tensors]
    digest = hashlib.sha256()
    for info, (data,) in read_ahead(items):
        digest.update(data)
        if info is not None and not bool(tensor_from_bytes(data, info.dtype, info.shape).isfinite().all()):
            raise InputError(f"{storage.describe(WEIGHTS_NAME)}: tensor {info.name}", "holds NaN or Inf values",
                             "the adapter is broken; retrain it or export it again")
    return digest.hexdigest()


def stage_pickled_adapter(source: Storage, staging: Storage) -> None:
    """Convert a pickle-only adapter (adapter_model.bin) to safetensors in `staging`.

    Only with the user's explicit consent (--allow-pickle), and only through
    torch.load(weights_only=True), which rebuilds tensors and plain containers and refuses
    anything else: no code from the file runs."""
    where = source.describe(PICKLE_WEIGHTS_NAME)
    try:
        state = torch.load(io.BytesIO(source.read_bytes(PICKLE_WEIGHTS_NAME)), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(where, f"is not a plain pickle of tensors ({type(exc).__name__})",
                         "re-save the adapter with safe_serialization=True") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise InputError(where, "does not hold a map of names to tensors", "re-save the adapter with PEFT")
    staging.write_bytes(CONFIG_NAME, source.read_bytes(CONFIG_NAME))
    staging.write_bytes(WEIGHTS_NAME, save_safetensors({k: v.contiguous().clone() for k, v in state.items()}))


def load_adapter(storage: Storage) -> LoraAdapter:
    config = _check_config(read_json(storage, CONFIG_NAME, "point --adapter at a PEFT adapter directory"),
                           storage.describe(CONFIG_NAME))
    if not storage.exists(WEIGHTS_NAME):
        if storage.exists(PICKLE_WEIGHTS_NAME):
            raise InputError(storage.describe(PICKLE_WEIGHTS_NAME), "adapter is stored only as a pickle, "
                             "which lora-merge does not unpickle unasked",
                             "re-save the adapter with safe_serialization=True, or pass --allow-pickle to load it "
                             "with torch.load(weights_only=True)")
        raise InputError(storage.describe(WEIGHTS_NAME), "file not found",
                         "point --adapter at a PEFT adapter directory")
    where = storage.describe(WEIGHTS_NAME)
    header = read_shard_header(storage, WEIGHTS_NAME)
    if not header.tensors:
        raise InputError(where, "holds no tensors", "the adapter is empty; re-save it after training")

    pairs = []
    for module, sides in sorted(_pair_keys(header, where).items()):
        bias = sides.pop("bias", None)
        if set(sides) != {"A", "B"}:
            lacking = "lora_B" if "A" in sides else "lora_A"
            raise InputError(f"{where}: module {module}", f"has no {lacking} weight", "re-save the adapter with PEFT")
        a, b = sides["A"], sides["B"]
        rank, scale = lora_scale(config, module)
        if a.shape[0] != b.shape[1]:
            raise InputError(f"{where}: module {module}", f"lora_A rank {a.shape[0]} and lora_B rank {b.shape[1]} "
                             "disagree", "re-save the adapter with PEFT")
        if a.shape[0] != rank:
            raise InputError(f"{where}: module {module}", f"tensors have rank {a.shape[0]} but the config gives "
                             f"{rank} (r/rank_pattern)", "fix r or rank_pattern in adapter_config.json")
        if bias is not None and bias.shape != (b.shape[0],):
            raise InputError(f"{where}: tensor {bias.name}", f"shape {list(bias.shape)} does not match lora_B's "
                             f"{b.shape[0]} outputs", "re-save the adapter with PEFT")
        pairs.append(LoraPair(module, f"{module}.weight", a, b, rank, scale, bool(config.get("fan_in_fan_out")),
                              bias))
    return LoraAdapter(storage.uri, config, header, tuple(pairs))
