"""What a location holds when it is not what was asked for: a file given for its folder, an
adapter given as the base or a model as the adapter, or nothing at all. Each finding becomes the
one-line error that names the location and says what to pass instead."""

from __future__ import annotations

from merge_core.errors import InputError
from merge_core.io.registry import open_storage
from merge_core.io.storage import Storage
from merge_core.names import ADAPTER_CONFIG_NAME, ADAPTER_PICKLE_NAME, ADAPTER_WEIGHTS_NAME, INDEX_NAME, SINGLE_NAME

MODEL_FILES = (INDEX_NAME, SINGLE_NAME)
ADAPTER_FILES = (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, ADAPTER_PICKLE_NAME)


def _file_in_parent(storage: Storage) -> tuple[str, str] | None:
    """(parent URI, file name) when the location names a file rather than a folder or prefix."""
    parent, sep, name = storage.uri.rstrip("/").rpartition("/")
    if not sep or not name or not parent or parent.endswith(":/"):
        return None
    try:
        return (parent, name) if open_storage(parent).exists(name) else None
    except (InputError, OSError):
        return None


def _nothing_there(storage: Storage, flag: str, folder: str) -> InputError:
    """The error for a location that lists nothing: a file named where its `folder` was meant, or nothing."""
    inside = _file_in_parent(storage)
    if inside:
        parent, name = inside
        return InputError(storage.uri, f"is the file {name}, not {folder}", f"pass the folder that holds it: {flag} "
                          f"{parent}")
    return InputError(storage.uri, "does not exist or is empty", f"check the path given as {flag}")


def not_a_model(storage: Storage, flag: str = "--base") -> InputError:
    """Why `storage` holds no checkpoint, as the error to raise."""
    names = set(storage.list_names())
    if not names:
        return _nothing_there(storage, flag, "the folder of a checkpoint")
    if names & set(ADAPTER_FILES):
        return InputError(storage.uri, f"holds a PEFT adapter ({ADAPTER_CONFIG_NAME}), not a model",
                          f"were {flag} and --adapter swapped? pass the base model as {flag} and this folder as "
                          "--adapter")
    shown = ", ".join(sorted(names)[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return InputError(storage.uri, f"no {INDEX_NAME} or {SINGLE_NAME} found; it holds {shown}",
                      f"point {flag} at a Hugging Face checkpoint saved with safetensors")


def not_an_adapter(storage: Storage) -> InputError | None:
    """Why `storage` is no PEFT adapter, when it is something else (a file, a model, nothing)."""
    names = set(storage.list_names())
    if names & set(ADAPTER_FILES):
        return None  # an adapter, perhaps a broken one: its own checks say what is wrong
    if not names:
        return _nothing_there(storage, "--adapter", "an adapter folder")
    if names & set(MODEL_FILES):
        return InputError(storage.uri, f"holds a model and no {ADAPTER_CONFIG_NAME}: it is not a PEFT adapter",
                          "were --base and --adapter swapped? pass this folder as --base and the adapter as "
                          "--adapter")
    return InputError(storage.describe(ADAPTER_CONFIG_NAME), "file not found",
                      "point --adapter at a PEFT adapter directory")
