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

from merge_core.errors import InputError
from merge_core.format.header import FLOAT_DTYPES, ShardHeader, TensorInfo, count_nonfinite
from merge_core.inputs.checkpoint import read_json, read_shard_header
from merge_core.io.pipeline import Item, Read, read_ahead
from merge_core.io.storage import Storage
from merge_core.names import ADAPTER_CONFIG_NAME, ADAPTER_PICKLE_NAME, ADAPTER_WEIGHTS_NAME, TOKENIZER_FILES

KEY_PREFIX = "base_model.model."
SUPPORTED_PEFT_TYPES = ("LORA", "IA3", "LOHA", "LOKR")
# Config fields each supported type needs.
REQUIRED_FIELDS = {"LORA": ("r", "lora_alpha"), "IA3": (), "LOHA": ("r", "alpha"), "LOKR": ("r", "alpha")}
# Config switches that change what a merge computes in ways lora-merge does not reproduce: an
# adapter that sets one is refused by name rather than merged as if it were plain LoRA.
UNSUPPORTED_SWITCHES = (
    "use_qalora", "use_bdlora", "arrow_config", "alora_invocation_tokens", "velora_config", "monteclora_config",
    "kasa_config", "layer_replication", "trainable_token_indices", "ensure_weight_tying",
)
# init_lora_weights values whose initialisation rewrites the base weight (W_res = W - B₀A₀, or a
# quantisation residual). PEFT redoes that on load, so its merge is right; adding B·A to the
# untouched base would not be. Adapters converted on save (path_initial_model_for_weight_conversion)
# say init_lora_weights=true and merge as plain LoRA.
BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
# The modules whose rows are the vocabulary: PEFT saves the input and output embeddings whole
# when they are targeted or resized, under the model's own names for them (Llama's embed_tokens
# and lm_head, GPT-2's wte, BLOOM's word_embeddings, GPT-NeoX's embed_in and embed_out).
VOCABULARY_MODULES = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_in", "embed_out")
# Saved-key suffixes of each adapter type's tensors: suffix → role in its update.
SUFFIXES = {
    "LORA": {"lora_A.weight": "A", "lora_B.weight": "B", "lora_B.bias": "bias", "lora_embedding_A": "emb_A",
             "lora_embedding_B": "emb_B", "lora_magnitude_vector": "magnitude",
             "lora_magnitude_vector.weight": "magnitude"},
    "IA3": {"ia3_l": "l"},
    "LOHA": {f"hada_{n}": n for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    "LOKR": {f"lokr_{n}": n for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
}
_SUFFIX_RE = {kind: re.compile(r"^(?P<module>.+)\.(?P<suffix>" + "|".join(re.escape(k) for k in sorted(
    table, key=len, reverse=True)) + ")$") for kind, table in SUFFIXES.items()}

# What an update does to its base tensor W (ΔW in float32; dt is W's dtype):
#   lora       W ← round(W + (B@A)[ᵀ]·s)           Linear, GPT-2 Conv1D (transposed), 1×1 conv
#   conv       W ← round(W + conv(Aᵀ, B)ᵀ·s)        k×k convolutions
#   embedding  W ← round(W + round(ΔW))             nn.Embedding: PEFT adds ΔW rounded to dt
#   dora       W ← round(m/‖W+ΔW‖ · (W+ΔW))         DoRA on Linear/Conv1D/Embedding/conv
#   bias       b ← round(b + s·lora_B.bias)          lora_bias
#   loha/lokr  W ← round(W + ΔW)                    LyCORIS formulas
#   param      W ← round(W + round(ΔW))             target_parameters (MoE experts): PEFT's ParamWrapper
#   ia3        W ← round(W · l)                      rows or columns; the bias with the rows
#   replace    W ← round(T)                          modules_to_save, and embeddings PEFT saved whole
KINDS = ("lora", "conv", "embedding", "dora", "bias", "loha", "lokr", "ia3", "param", "replace")
# The kinds whose ΔW PEFT rounds to W's dtype before adding it.
ROUNDED_DELTA_KINDS = ("embedding", "param")
# The order in which transformers' MoE expert modules register their parameters. PEFT wraps each
# targeted parameter of a module (target_parameters) around the wrapper of the one before it, so
# the last one's lora_A is saved as <module>.lora_A.weight, the one before as
# <module>.base_layer.lora_A.weight, and so on.
PARAMETER_ORDER = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModuleUpdate:
    """One adapter's update of one base tensor."""
    module: str
    target: str  # the base tensor it updates
    kind: str
    factors: tuple[TensorInfo, ...]  # the adapter tensors it reads, in `roles` order
    roles: tuple[str, ...]
    scale: float = 1.0
    transpose: bool = False  # W is stored in×out (fan_in_fan_out, embeddings): ΔW is transposed
    rank: int = 0
    # param: (E,) for a whole (E, ·, ·) expert tensor, (E, e) for expert e's share stored as a
    # tensor of its own (whose factors are then the slices of A and B that expert's rows use)
    experts: tuple[int, ...] = ()
    # replace: "modules_to_save" for the trained copy PEFT keeps beside the original module (a
    # tied embedding's other half keeps the original); "original_module" for that original, saved
    # with it; "" for a tensor loaded over the module's own
    saved_as: str = ""

    @property
    def trained_copy(self) -> bool:
        return self.saved_as == "modules_to_save"

    def factor(self, role: str) -> TensorInfo:
        return self.factors[self.roles.index(role)]


@dataclass(frozen=True)
class LoraAdapter:
    uri: str
    config: Mapping[str, object]
    header: ShardHeader
    updates: tuple[ModuleUpdate, ...]
    tokenizer_files: tuple[str, ...] = ()  # a tokenizer saved beside the adapter (after adding tokens)

    @property
    def peft_type(self) -> str:
        return str(self.config["peft_type"])


def pattern_key(pattern_keys: Sequence[str], module: str) -> str | None:
    """The rank_pattern/alpha_pattern key that applies to a module, matched as PEFT matches it:
    the key, as a regex, must match the whole module name or a dotted suffix of it; first wins."""
    for key in pattern_keys:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error as exc:
            raise InputError(ADAPTER_CONFIG_NAME, f"pattern {key!r} in rank_pattern/alpha_pattern is not a valid regular "
                             f"expression ({exc})", "fix the pattern") from None
    return None


def lora_scale(config: Mapping[str, object], module: str) -> tuple[int, float]:
    """(rank, scale) for one module, as PEFT's update_layer computes them: alpha/r (LoRA's
    lora_alpha, LoHa's and LoKr's alpha), or alpha/√r with rsLoRA."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r_key = pattern_key(list(rank_pattern), module)
    alpha_key = pattern_key(list(alpha_pattern), module)
    rank = rank_pattern[r_key] if r_key is not None else config["r"]
    alpha = alpha_pattern[alpha_key] if alpha_key is not None else config.get("lora_alpha", config.get("alpha"))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return int(rank), scale


def _check_config(config: object, where: str) -> Mapping[str, object]:
    if not isinstance(config, dict) or "peft_type" not in config:
        raise InputError(where, "is not a PEFT adapter config (no peft_type)", "regenerate it with PEFT's save_pretrained")
    if config["peft_type"] not in SUPPORTED_PEFT_TYPES:
        raise InputError(where, f"peft_type {config['peft_type']!r} is not supported",
                         f"supported: {', '.join(SUPPORTED_PEFT_TYPES)}; merge other types with PEFT's merge_and_unload")
    missing = [f for f in REQUIRED_FIELDS[config["peft_type"]] if f not in config]
    if missing:
        raise InputError(where, f"lacks required field(s) {', '.join(missing)}",
                         "regenerate it with PEFT's save_pretrained")
    for name in REQUIRED_FIELDS[config["peft_type"]]:
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


def _group_keys(header: ShardHeader, peft_type: str, where: str
                ) -> tuple[dict[str, dict[str, TensorInfo]], list[TensorInfo]]:
    """Adapter tensors grouped by module and role; and the other tensors (whole-tensor copies)."""
    modules: dict[str, dict[str, TensorInfo]] = {}
    others = []
    for info in header.tensors:
        key = info.name
        if not key.startswith(KEY_PREFIX):
            raise InputError(f"{where}: tensor {key}", f"key does not start with {KEY_PREFIX!r}",
                             "this is not a PEFT adapter file; save the adapter with PEFT's save_pretrained")
        if info.dtype not in FLOAT_DTYPES:
            raise InputError(f"{where}: tensor {key}", f"is {info.dtype}, not a float tensor",
                             "re-save the adapter with PEFT")
        match = _SUFFIX_RE[peft_type].match(key[len(KEY_PREFIX):])
        if match is None:
            others.append(info)
            continue
        modules.setdefault(match["module"], {})[SUFFIXES[peft_type][match["suffix"]]] = info
    return modules, others


def _module_in(module: str, names: object) -> bool:
    """Whether `module` is one of `names` (a config list, matched as PEFT matches modules_to_save:
    the name itself or a dotted suffix)."""
    return isinstance(names, list) and any(module == n or module.endswith(f".{n}") for n in names)


def _whole_tensor(info: TensorInfo, config: Mapping[str, object], lora_modules: set[str], where: str
                  ) -> ModuleUpdate | None:
    """A tensor PEFT saved whole, which replaces the base's when the adapter loads: a
    modules_to_save copy, or the embedding layer saved with a targeted or resized vocabulary.
    None for one PEFT does not load: a modules_to_save copy saved a second time under its
    wrapper's name (with save_embedding_layers)."""
    key = info.name[len(KEY_PREFIX):]
    module, _, param = key.rpartition(".")
    owner, _, wrapper_part = module.rpartition(".")
    saved_as = ""
    if module.endswith(".base_layer") and module[:-len(".base_layer")] in lora_modules:
        module = module[:-len(".base_layer")]
    elif wrapper_part in ("modules_to_save", "original_module") and _module_in(owner, config.get("modules_to_save")):
        if wrapper_part == "modules_to_save":
            return None
        module, saved_as = owner, wrapper_part
    elif _module_in(module, config.get("modules_to_save")):
        saved_as = "modules_to_save"
    elif module.rpartition(".")[2] not in VOCABULARY_MODULES:
        raise InputError(f"{where}: tensor {info.name}", "is neither an adapter weight nor a module PEFT saves whole",
                         "remove it from the adapter or re-save the adapter with PEFT")
    return ModuleUpdate(module, f"{module}.{param}", "replace", (info,), ("tensor",), saved_as=saved_as)


# Roles by the names of the saved tensors, for messages.
_ROLE_KEYS = {role: suffix.removesuffix(".weight") for table in SUFFIXES.values() for suffix, role in table.items()}


def _require(sides: Mapping[str, TensorInfo], roles: Sequence[str], module: str, where: str) -> tuple[TensorInfo, ...]:
    lacking = [_ROLE_KEYS.get(r, r) for r in roles if r not in sides]
    if lacking:
        raise InputError(f"{where}: module {module}", f"has no {', '.join(lacking)} weight",
                         "re-save the adapter with PEFT")
    return tuple(sides[r] for r in roles)


def _shape_error(module: str, what: str, where: str) -> InputError:
    return InputError(f"{where}: module {module}", what, "re-save the adapter with PEFT")


def _lora_updates(module: str, sides: dict[str, TensorInfo], config: Mapping[str, object], where: str
                  ) -> list[ModuleUpdate]:
    rank, scale = lora_scale(config, module)
    magnitude = sides.pop("magnitude", None)
    bias = sides.pop("bias", None)
    if "emb_A" in sides or "emb_B" in sides:
        a, b = _require(sides, ("emb_A", "emb_B"), module, where)
        kind, transpose = "embedding", True
    else:
        a, b = _require(sides, ("A", "B"), module, where)
        conv = len(a.shape) > 2 and not (len(a.shape) == 4 and a.shape[2:] == (1, 1))
        kind, transpose = ("conv" if conv else "lora"), bool(config.get("fan_in_fan_out")) and len(a.shape) == 2
    if len(a.shape) < 2 or len(b.shape) != len(a.shape):
        raise _shape_error(module, f"lora_A {list(a.shape)} and lora_B {list(b.shape)} do not pair", where)
    if a.shape[0] != b.shape[1]:
        raise _shape_error(module, f"lora_A rank {a.shape[0]} and lora_B rank {b.shape[1]} disagree", where)
    if a.shape[0] != rank:
        raise InputError(f"{where}: module {module}", f"tensors have rank {a.shape[0]} but the config gives "
                         f"{rank} (r/rank_pattern)", "fix r or rank_pattern in adapter_config.json")
    factors, roles = (a, b), ("A", "B")
    if magnitude is not None:
        factors, roles = (a, b, magnitude), ("A", "B", "magnitude")
        kind = "dora"
    updates = [ModuleUpdate(module, f"{module}.weight", kind, factors, roles, scale, transpose, rank)]
    if bias is not None:
        if bias.shape != (b.shape[0],):
            raise InputError(f"{where}: tensor {bias.name}", f"shape {list(bias.shape)} does not match lora_B's "
                             f"{b.shape[0]} outputs", "re-save the adapter with PEFT")
        updates.append(ModuleUpdate(module, f"{module}.bias", "bias", (bias,), ("bias",), scale, rank=rank))
    if sides.keys() - {"A", "B", "emb_A", "emb_B"}:
        raise _shape_error(module, f"has unexpected tensors {sorted(sides)}", where)
    return updates


def _ia3_updates(module: str, sides: dict[str, TensorInfo], config: Mapping[str, object], where: str
                 ) -> list[ModuleUpdate]:
    (vector,) = _require(sides, ("l",), module, where)
    feedforward = config.get("feedforward_modules")
    if isinstance(feedforward, str):
        is_ff = re.fullmatch(feedforward, module) is not None
    else:
        is_ff = any(module.endswith(entry) for entry in feedforward or ())
    # The vector scales W's inputs (columns) on feedforward layers, else its outputs (rows) and bias.
    side = "in" if is_ff else "out"
    updates = [ModuleUpdate(module, f"{module}.weight", "ia3", (vector,), (side,),
                            transpose=bool(config.get("fan_in_fan_out")))]
    if not is_ff:
        updates.append(ModuleUpdate(module, f"{module}.bias", "ia3", (vector,), ("bias",)))
    return updates


def _lycoris_updates(module: str, sides: dict[str, TensorInfo], config: Mapping[str, object], where: str
                     ) -> list[ModuleUpdate]:
    rank, scale = lora_scale(config | {"use_rslora": False}, module)
    kind = "loha" if config["peft_type"] == "LOHA" else "lokr"
    if kind == "loha":
        needed = ("w1_a", "w1_b", "w2_a", "w2_b") + (("t1", "t2") if "t1" in sides or "t2" in sides else ())
    else:
        needed = (("w1",) if "w1" in sides else ("w1_a", "w1_b")) + (
            ("w2",) if "w2" in sides else ("t2", "w2_a", "w2_b") if "t2" in sides else ("w2_a", "w2_b"))
    factors = _require(sides, needed, module, where)
    if set(sides) - set(needed):
        raise _shape_error(module, f"has unexpected tensors {sorted(set(sides) - set(needed))}", where)
    return [ModuleUpdate(module, f"{module}.weight", kind, factors, needed, scale, rank=rank)]


def _targeted_module(module: str, target_modules: object) -> bool:
    """Whether target_modules names a module, as PEFT matches it (a regular expression the whole
    name matches, or a list of names and dotted suffixes): its LoRA is then an ordinary layer's,
    whatever a bare name in target_parameters also matches."""
    if isinstance(target_modules, str):
        try:
            return re.fullmatch(target_modules, module) is not None
        except re.error:
            return False
    return _module_in(module, target_modules)


def _parameter_updates(modules: dict[str, dict[str, TensorInfo]], config: Mapping[str, object], where: str
                       ) -> list[ModuleUpdate]:
    """LoRA on parameters (target_parameters, MoE expert tensors): takes the modules it owns out
    of `modules`. A module's targeted parameters are told apart by how deep their wrappers nest."""
    targets = [t for t in config.get("target_parameters") or () if isinstance(t, str)]
    nested: dict[str, dict[int, dict[str, TensorInfo]]] = {}
    params: dict[str, list[str]] = {}
    for name in list(modules):
        module, depth = name, 0
        while module.endswith(".base_layer"):
            module, depth = module[:-len(".base_layer")], depth + 1
        # PEFT matches <module>.<parameter> against each target, whole or as a dotted suffix
        keys = {t: f"{module}.{t.rpartition('.')[2]}" for t in targets}
        matching = [key.rpartition(".")[2] for t, key in keys.items() if key == t or key.endswith(f".{t}")]
        if matching and not (depth == 0 and _targeted_module(module, config.get("target_modules"))):
            nested.setdefault(module, {})[depth] = modules.pop(name)
            params[module] = sorted(set(matching), key=lambda p: ((PARAMETER_ORDER + (p,)).index(p), p))
    updates = []
    for module, by_depth in sorted(nested.items()):
        names = params[module]
        if len(names) > 1 and not set(names) <= set(PARAMETER_ORDER):
            raise InputError(f"{where}: module {module}", f"has LoRA on several parameters {names} whose nesting "
                             "order lora-merge does not know", "merge this adapter with PEFT's merge_and_unload")
        if sorted(by_depth) != list(range(len(names))):
            raise InputError(f"{where}: module {module}", f"has LoRA weights at {len(by_depth)} nesting depth(s) for "
                             f"{len(names)} targeted parameter(s) {names}", "re-save the adapter with PEFT")
        for position, param in enumerate(names):
            sides = dict(by_depth[len(names) - 1 - position])  # the first registered is the innermost
            a, b = _require(sides, ("A", "B"), module, where)
            if set(sides) - {"A", "B"}:
                raise _shape_error(module, f"has unexpected tensors {sorted(set(sides) - {'A', 'B'})}", where)
            rank, scale = lora_scale(config, f"{module}.{param}")
            if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1] or a.shape[0] % rank:
                raise _shape_error(module, f"lora_A {list(a.shape)} and lora_B {list(b.shape)} of {param} do not "
                                   f"pair as rank {rank} × experts", where)
            updates.append(ModuleUpdate(module, f"{module}.{param}", "param", (a, b), ("A", "B"), scale, rank=rank,
                                        experts=(a.shape[0] // rank,)))
    return updates


UPDATE_BUILDERS = {"LORA": _lora_updates, "IA3": _ia3_updates, "LOHA": _lycoris_updates, "LOKR": _lycoris_updates}


def scan_adapter(storage: Storage, adapter: LoraAdapter) -> str:
    """Read the adapter's weights once, in order: every tensor must be finite. Returns the file's sha256."""
    header = adapter.header
    items = [Item(None, (Read(storage, ADAPTER_WEIGHTS_NAME, 0, header.data_start),))]
    items += [Item(info, (Read(storage, ADAPTER_WEIGHTS_NAME, header.data_start + info.start, info.nbytes),))
              for info in header.tensors]
    digest = hashlib.sha256()
    for info, (data,) in read_ahead(items):
        digest.update(data)
        if info is not None and count_nonfinite(data, info.dtype):
            raise InputError(f"{storage.describe(ADAPTER_WEIGHTS_NAME)}: tensor {info.name}", "holds NaN or Inf values",
                             "the adapter is broken; retrain it or export it again")
    return digest.hexdigest()


def stage_pickled_adapter(source: Storage, staging: Storage) -> None:
    """Convert a pickle-only adapter (adapter_model.bin) to safetensors in `staging`.

    Only with the user's explicit consent (--allow-pickle), and only through
    torch.load(weights_only=True), which rebuilds tensors and plain containers and refuses
    anything else: no code from the file runs."""
    import torch
    from safetensors.torch import save as save_safetensors

    where = source.describe(ADAPTER_PICKLE_NAME)
    try:
        state = torch.load(io.BytesIO(source.read_bytes(ADAPTER_PICKLE_NAME)), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(where, f"is not a plain pickle of tensors ({type(exc).__name__})",
                         "re-save the adapter with safe_serialization=True") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise InputError(where, "does not hold a map of names to tensors", "re-save the adapter with PEFT")
    staging.write_bytes(ADAPTER_CONFIG_NAME, source.read_bytes(ADAPTER_CONFIG_NAME))
    staging.write_bytes(ADAPTER_WEIGHTS_NAME, save_safetensors({k: v.contiguous().clone() for k, v in state.items()}))


def load_adapter(storage: Storage) -> LoraAdapter:
    config = _check_config(read_json(storage, ADAPTER_CONFIG_NAME, "point --adapter at a PEFT adapter directory"),
                           storage.describe(ADAPTER_CONFIG_NAME))
    if not storage.exists(ADAPTER_WEIGHTS_NAME):
        if storage.exists(ADAPTER_PICKLE_NAME):
            raise InputError(storage.describe(ADAPTER_PICKLE_NAME), "adapter is stored only as a pickle, "
                             "which lora-merge does not unpickle unasked",
                             "re-save the adapter with safe_serialization=True, or pass --allow-pickle to load it "
                             "with torch.load(weights_only=True)")
        raise InputError(storage.describe(ADAPTER_WEIGHTS_NAME), "file not found",
                         "point --adapter at a PEFT adapter directory")
    where = storage.describe(ADAPTER_WEIGHTS_NAME)
    header = read_shard_header(storage, ADAPTER_WEIGHTS_NAME)
    if not header.tensors:
        raise InputError(where, "holds no tensors", "the adapter is empty; re-save it after training")

    peft_type = str(config["peft_type"])
    modules, others = _group_keys(header, peft_type, where)
    updates = _parameter_updates(modules, config, where)
    updates += [u for u in (_whole_tensor(info, config, set(modules), where) for info in others) if u is not None]
    for module, sides in sorted(modules.items()):
        updates += UPDATE_BUILDERS[peft_type](module, dict(sides), config, where)
    tokenizer = tuple(n for n in storage.list_names() if n in TOKENIZER_FILES)
    return LoraAdapter(storage.uri, config, header, tuple(updates), tokenizer)
