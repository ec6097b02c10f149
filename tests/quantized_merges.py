"""PEFT's float32 merge as the reference for merges into quantized bases, and a merge that must keep the
base's layout: what tests/merge_core/worker's quantized tests share.

The reference merge is PEFT's own merge_and_unload, in float32, into a model whose quantized weights hold
the float32 values their format's library decompresses them to: W' there has the bits lora-merge's
float32 fuse gives.
"""

from __future__ import annotations

import warnings

import torch

from tests.local_merge import merge_without_ray
from tests.quantized_models import read_config, stored_tensors, write_sharded
from tests.reference import load_checkpoint
from tests.variant_reference import build_adapter


def exact_base(checkpoint, path: str) -> str:
    """The base with its quantized weights' float32 values, bf16 elsewhere, no quantization_config."""
    config = read_config(checkpoint.path)
    config.pop("quantization_config", None)
    if config.get("text_config", {}).pop("quantization_config", None) is not None and not config["text_config"]:
        del config["text_config"]  # it held the quantization_config only
    tensors = {name: t.float() for name, t in checkpoint.dequantized.items()} | dict(checkpoint.exact)
    return write_sharded(path, tensors, config, shards=1)


def peft_float32(model_cls, base: str, adapter: str, out: str) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(model_cls.from_pretrained(base, dtype=torch.float32),
                                           adapter).merge_and_unload()
        merged.save_pretrained(out)
    return load_checkpoint(out)


def reference_case(checkpoint, model_cls, peft_config, root) -> tuple[str, dict[str, torch.Tensor]]:
    """(an adapter trained on the decompressed base, PEFT's float32 merge of it)."""
    exact = exact_base(checkpoint, str(root / "exact"))
    adapter = build_adapter((model_cls, None), exact, str(root / "adapter"), peft_config)
    return adapter, peft_float32(model_cls, exact, adapter, str(root / "peft"))


def merged_in_format(checkpoint, adapter: str, out: str, **options) -> tuple[dict, dict]:
    """(the base's stored tensors, the merge's): the same names, dtypes and shapes, config.json unchanged."""
    merge_without_ray(checkpoint.path, [adapter], out, **options)
    base, merged = stored_tensors(checkpoint.path), stored_tensors(out)
    assert {k: (v.dtype, v.shape) for k, v in merged.items()} == {k: (v.dtype, v.shape) for k, v in base.items()}
    assert read_config(out) == read_config(checkpoint.path), "config.json unchanged"
    return base, merged
