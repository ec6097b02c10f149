"""Reading an adapter's weight file whole: the finiteness scan that also hashes it, and the
consented conversion of a pickle-only adapter."""

from __future__ import annotations

import hashlib
import io

from merge_core.errors import InputError
from merge_core.format.header import count_nonfinite
from merge_core.inputs.adapter import LoraAdapter
from merge_core.io.pipeline import Item, Read, read_ahead
from merge_core.io.storage import Storage
from merge_core.names import ADAPTER_CONFIG_NAME, ADAPTER_PICKLE_NAME, ADAPTER_WEIGHTS_NAME


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
