"""ModelOpt's quantization settings, read as vLLM's ModelOptQuantConfigBase.from_config reads them, from
either place ModelOpt's export writes them (modelopt/torch/export/quant_utils.get_quant_config and
convert_hf_config.convert_hf_quant_config_format):

    hf_quant_config.json     {"producer": {...}, "quantization": {"quant_algo": "NVFP4", "group_size": 16,
                              "kv_cache_quant_algo": null, "exclude_modules": ["lm_head", ...]}}
    config.json              "quantization_config": {"quant_method": "modelopt", "quant_algo": "NVFP4",
                              "ignore": [...], "config_groups": {...}, ...}

quant_algo is upper-cased as vLLM does. MIXED_PRECISION names each quantized layer's own algorithm in
`quantized_layers` ({module: {"quant_algo": "FP8"}, ...}). exclude_modules / ignore are kept as written:
what is stored decides which weights are quantized.

Torch-free: the driver reads the settings through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from merge_core.errors import InputError
from merge_core.format.codecs.checks import UNQUANTIZED_FIX, module_names
from merge_core.format.quantization import QuantScheme

MIXED = "MIXED_PRECISION"
NV_GROUP = 16
# vLLM's candidates for a layer name (ModelOptMixedPrecisionConfig._quantized_layer_prefix_candidates)
PREFIX_ALIASES = (("language_model.model.", "model.language_model."),
                  ("model.language_model.", "language_model.model."))


@dataclass(frozen=True)
class Layer:
    """One entry of quantized_layers (module None: every quantized module)."""

    module: str | None
    algo: str


def read_settings(q: object, subject: str, algos: tuple[str, ...], method: str) -> QuantScheme:
    """The `quantization` object of hf_quant_config.json, or config.json's quantization_config."""
    if not isinstance(q, dict):
        raise InputError(subject, f"{q!r} is not a JSON object", "fix the file ModelOpt wrote")
    algo = _algo(q.get("quant_algo"), f"{subject}.quant_algo", algos + (MIXED,))
    _check_group_size(q, subject, algo)
    if algo != MIXED:
        layers = (Layer(None, algo),)
    else:
        given = q.get("quantized_layers")
        if not isinstance(given, dict) or not given:
            raise InputError(f"{subject}.quantized_layers", f"{given!r}: MIXED_PRECISION needs each quantized layer's "
                             "quant_algo ({module: {\"quant_algo\": ...}})", "fix the file ModelOpt wrote")
        layers = tuple(_layer(module, entry, f"{subject}.quantized_layers.{module}", algos)
                       for module, entry in sorted(given.items()))
    return QuantScheme(method, groups=layers, not_converted=module_names(q, ("exclude_modules", "ignore"), subject))


def _layer(module: str, entry: object, subject: str, algos: tuple[str, ...]) -> Layer:
    if not isinstance(entry, dict):
        raise InputError(subject, f"{entry!r} is not a JSON object", "fix the file ModelOpt wrote")
    algo = _algo(entry.get("quant_algo"), f"{subject}.quant_algo", algos)
    _check_group_size(entry, subject, algo)
    return Layer(module, algo)


def _algo(value: object, subject: str, supported: tuple[str, ...]) -> str:
    algo = str(value).upper() if isinstance(value, str) else None
    if algo not in supported:
        raise InputError(subject, f"{value!r} is not a quant_algo lora-merge can keep (supported: "
                         f"{', '.join(supported)})", UNQUANTIZED_FIX)
    return algo


def _check_group_size(q: Mapping, subject: str, algo: str) -> None:
    size = q.get("group_size")
    if "NVFP4" in algo and size not in (None, NV_GROUP):
        raise InputError(f"{subject}.group_size", f"{size!r}: NVFP4 scales cover {NV_GROUP} values each",
                         "fix the file ModelOpt wrote")


def algo_of(scheme: QuantScheme, module: str) -> str | None:
    """A quantized module's quant_algo: the checkpoint's, or its entry in quantized_layers (under either of
    a multimodal model's prefixes), None when it has none."""
    layers: tuple[Layer, ...] = scheme.groups
    if layers[0].module is None:
        return layers[0].algo
    by_module = {layer.module: layer.algo for layer in layers}
    candidates = [module] + [new + module[len(old):] for old, new in PREFIX_ALIASES if module.startswith(old)]
    return next((by_module[c] for c in candidates if c in by_module), None)
