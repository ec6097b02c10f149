"""config.json's keys a merge changes: a resized vocabulary's vocab_size, an untied head's
tie_word_embeddings, and --dequantize's removal of quantization_config."""

from __future__ import annotations

from merge_core.inputs.checkpoint import BaseCheckpoint

QUANTIZATION_KEY = "quantization_config"


def config_updates(base: BaseCheckpoint, vocab_size: int | None, untied: bool, dequantized: bool = False
                   ) -> tuple[dict[str, object], tuple[str, ...]]:
    """(keys set, keys removed) of config.json: vocab_size (top level, or a multimodal model's
    text_config), tie_word_embeddings when the merge unties the head, no quantization_config when it
    dequantizes (at the top level or in text_config, where Kimi K2.5 keeps it). Nothing without a
    config.json."""
    updates: dict[str, object] = {}
    removed: tuple[str, ...] = ()
    if not base.config:
        return updates, removed
    text_config = base.config.get("text_config")
    text_config = dict(text_config) if isinstance(text_config, dict) else None
    if vocab_size is not None:
        if "vocab_size" not in base.config and text_config is not None and "vocab_size" in text_config:
            text_config["vocab_size"] = vocab_size
            updates["text_config"] = text_config
        else:
            updates["vocab_size"] = vocab_size
    if untied:
        updates["tie_word_embeddings"] = False
    if dequantized:
        if QUANTIZATION_KEY in base.config:
            removed = (QUANTIZATION_KEY,)
        elif text_config is not None and QUANTIZATION_KEY in text_config:
            del text_config[QUANTIZATION_KEY]
            updates["text_config"] = text_config
    return updates, removed
