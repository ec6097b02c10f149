"""A PEFT adapter's config: which types and switches lora-merge merges, and each module's scale.

Everything here reads adapter_config.json alone, as PEFT reads it, before any tensor is opened.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

from merge_core.errors import InputError
from merge_core.names import ADAPTER_CONFIG_NAME

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


def check_config(config: object, where: str) -> Mapping[str, object]:
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


def module_in(module: str, names: object) -> bool:
    """Whether `module` is one of `names` (a config list, matched as PEFT matches modules_to_save:
    the name itself or a dotted suffix)."""
    return isinstance(names, list) and any(module == n or module.endswith(f".{n}") for n in names)


def targeted_module(module: str, target_modules: object) -> bool:
    """Whether target_modules names a module, as PEFT matches it (a regular expression the whole
    name matches, or a list of names and dotted suffixes): its LoRA is then an ordinary layer's,
    whatever a bare name in target_parameters also matches."""
    if isinstance(target_modules, str):
        try:
            return re.fullmatch(target_modules, module) is not None
        except re.error:
            return False
    return module_in(module, target_modules)
