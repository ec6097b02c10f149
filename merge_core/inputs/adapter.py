"""PEFT adapters: the exact pairing of saved keys to the updates of base tensors.

A saved key looks like `base_model.model.<module>.lora_A.weight`. We parse the suffix rather
than searching for "lora" in the key, and every tensor in the file must be accounted for:
one we cannot place is an error, never silently dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from merge_core.errors import InputError
from merge_core.format.header import FLOAT_DTYPES, ShardHeader, TensorInfo
from merge_core.inputs.adapter_config import check_config, lora_scale, module_in, targeted_module
from merge_core.inputs.checkpoint import read_json, read_shard_header
from merge_core.inputs.location import not_an_adapter
from merge_core.io.storage import Storage
from merge_core.kinds import ExpertShare, Kind, is_conv_kernel
from merge_core.names import ADAPTER_CONFIG_NAME, ADAPTER_PICKLE_NAME, ADAPTER_WEIGHTS_NAME, TOKENIZER_FILES

KEY_PREFIX = "base_model.model."
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

# The order in which transformers' MoE expert modules register their parameters. PEFT wraps each
# targeted parameter of a module (target_parameters) around the wrapper of the one before it, so
# the last one's lora_A is saved as <module>.lora_A.weight, the one before as
# <module>.base_layer.lora_A.weight, and so on.
PARAMETER_ORDER = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, kw_only=True)
class ModuleUpdate:
    """One adapter's update of one base tensor."""
    module: str
    target: str  # the base tensor it updates
    kind: Kind
    factors: tuple[TensorInfo, ...]  # the adapter tensors it reads, in `roles` order
    roles: tuple[str, ...]
    scale: float = 1.0
    transpose: bool = False  # W is stored in×out (fan_in_fan_out, embeddings): ΔW is transposed
    rank: int = 0
    # param: the experts it covers (for one expert's own tensor, its factors are the slices of A
    # and B that expert's rows use)
    experts: ExpertShare | None = None
    side: str = ""  # ia3: which side of W its vector scales, "in" (columns), "out" (rows) or "bias"
    # replace: "modules_to_save" for the trained copy PEFT keeps beside the original module (a
    # tied embedding's other half keeps the original); "original_module" for that original, saved
    # with it; "" for a tensor loaded over the module's own
    saved_as: str = ""

    @property
    def trained_copy(self) -> bool:
        return self.saved_as == "modules_to_save"

    def factor(self, role: str) -> TensorInfo:
        return self.factors[self.roles.index(role)]


@dataclass(frozen=True, kw_only=True)
class LoraAdapter:
    uri: str
    config: Mapping[str, object]
    header: ShardHeader
    updates: tuple[ModuleUpdate, ...]
    tokenizer_files: tuple[str, ...] = ()  # a tokenizer saved beside the adapter (after adding tokens)

    @property
    def peft_type(self) -> str:
        return str(self.config["peft_type"])


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
    elif wrapper_part in ("modules_to_save", "original_module") and module_in(owner, config.get("modules_to_save")):
        if wrapper_part == "modules_to_save":
            return None
        module, saved_as = owner, wrapper_part
    elif module_in(module, config.get("modules_to_save")):
        saved_as = "modules_to_save"
    elif module.rpartition(".")[2] not in VOCABULARY_MODULES:
        raise InputError(f"{where}: tensor {info.name}", "is neither an adapter weight nor a module PEFT saves whole",
                         "remove it from the adapter or re-save the adapter with PEFT")
    return ModuleUpdate(module=module, target=f"{module}.{param}", kind=Kind.REPLACE, factors=(info,),
                        roles=("tensor",), saved_as=saved_as)


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
        kind, transpose = Kind.EMBEDDING, True
    else:
        a, b = _require(sides, ("A", "B"), module, where)
        kind = Kind.CONV if is_conv_kernel(a.shape) else Kind.LORA
        transpose = bool(config.get("fan_in_fan_out")) and len(a.shape) == 2
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
        kind = Kind.DORA
    updates = [ModuleUpdate(module=module, target=f"{module}.weight", kind=kind, factors=factors, roles=roles,
                            scale=scale, transpose=transpose, rank=rank)]
    if bias is not None:
        if bias.shape != (b.shape[0],):
            raise InputError(f"{where}: tensor {bias.name}", f"shape {list(bias.shape)} does not match lora_B's "
                             f"{b.shape[0]} outputs", "re-save the adapter with PEFT")
        updates.append(ModuleUpdate(module=module, target=f"{module}.bias", kind=Kind.BIAS, factors=(bias,),
                                    roles=("bias",), scale=scale, rank=rank))
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
    updates = [ModuleUpdate(module=module, target=f"{module}.weight", kind=Kind.IA3, factors=(vector,), roles=("l",),
                            transpose=bool(config.get("fan_in_fan_out")), side=side)]
    if not is_ff:
        updates.append(ModuleUpdate(module=module, target=f"{module}.bias", kind=Kind.IA3, factors=(vector,),
                                    roles=("l",), side="bias"))
    return updates


def _lycoris_updates(module: str, sides: dict[str, TensorInfo], config: Mapping[str, object], where: str
                     ) -> list[ModuleUpdate]:
    rank, scale = lora_scale(config | {"use_rslora": False}, module)
    kind = Kind.LOHA if config["peft_type"] == "LOHA" else Kind.LOKR
    if kind is Kind.LOHA:
        needed = ("w1_a", "w1_b", "w2_a", "w2_b") + (("t1", "t2") if "t1" in sides or "t2" in sides else ())
    else:
        needed = (("w1",) if "w1" in sides else ("w1_a", "w1_b")) + (
            ("w2",) if "w2" in sides else ("t2", "w2_a", "w2_b") if "t2" in sides else ("w2_a", "w2_b"))
    factors = _require(sides, needed, module, where)
    if set(sides) - set(needed):
        raise _shape_error(module, f"has unexpected tensors {sorted(set(sides) - set(needed))}", where)
    return [ModuleUpdate(module=module, target=f"{module}.weight", kind=kind, factors=factors, roles=needed,
                         scale=scale, rank=rank)]



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
        if matching and not (depth == 0 and targeted_module(module, config.get("target_modules"))):
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
            updates.append(ModuleUpdate(module=module, target=f"{module}.{param}", kind=Kind.PARAM, factors=(a, b),
                                        roles=("A", "B"), scale=scale, rank=rank,
                                        experts=ExpertShare(a.shape[0] // rank)))
    return updates


UPDATE_BUILDERS = {"LORA": _lora_updates, "IA3": _ia3_updates, "LOHA": _lycoris_updates, "LOKR": _lycoris_updates}


def load_adapter(storage: Storage) -> LoraAdapter:
    elsewhere = not_an_adapter(storage)
    if elsewhere:
        raise elsewhere
    config = check_config(read_json(storage, ADAPTER_CONFIG_NAME, "point --adapter at a PEFT adapter directory"),
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
    return LoraAdapter(uri=storage.uri, config=config, header=header, updates=tuple(updates), tokenizer_files=tokenizer)
