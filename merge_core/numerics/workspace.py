"""Where the fuse runs: the device, exact float32 products on it, and the buffers it reuses."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch

_EXACT_LOCK = threading.Lock()
_exact_depth = 0  # fuses inside exact_float32_matmul (several at once under --executor local)
_exact_saved: tuple[bool, str] | None = None


@contextmanager
def exact_float32_matmul() -> Iterator[None]:
    """TF32 would round matmul inputs to 10 mantissa bits on CUDA; the merge must not. The settings
    are the process's: the first fuse in sets them, the last one out restores the caller's."""
    global _exact_depth, _exact_saved
    with _EXACT_LOCK:
        if _exact_depth == 0:
            _exact_saved = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.set_float32_matmul_precision("highest")
        _exact_depth += 1
    try:
        yield
    finally:
        with _EXACT_LOCK:
            _exact_depth -= 1
            if _exact_depth == 0 and _exact_saved is not None:
                torch.backends.cuda.matmul.allow_tf32 = _exact_saved[0]
                torch.set_float32_matmul_precision(_exact_saved[1])


# On a CPU the elementwise work runs over row blocks of about this many elements, so that W's
# float32 copy, ΔW's block and the result stay in cache; on a GPU the whole tensor is one block.
BLOCK_ELEMENTS = 1 << 18


class Workspace:
    """Buffers a worker reuses from tensor to tensor and task to task: a fresh allocation of
    hundreds of MB costs more in page faults than the arithmetic done in it. Each slot grows to
    the largest tensor it has held. On a GPU, a pinned host buffer stages the copies both ways."""

    def __init__(self, device: torch.device):
        self.device = device
        self._slots: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def buffer(self, slot: str, dtype: torch.dtype, numel: int, pinned: bool = False) -> torch.Tensor:
        current = self._slots.get((slot, dtype))
        if current is None or current.numel() < numel:
            self._slots.pop((slot, dtype), None)  # free the old one before taking a bigger one
            current = (torch.empty(numel, dtype=dtype, pin_memory=True) if pinned
                       else torch.empty(numel, dtype=dtype, device=self.device))
            self._slots[(slot, dtype)] = current
        return current[:numel]

    @contextmanager
    def holding(self, rows: torch.Tensor) -> Iterator[torch.Tensor]:
        """`rows` where this workspace computes: themselves on the CPU (or already on its GPU), else a
        copy on the GPU, staged through a pinned host buffer and copied back when the block ends."""
        if self.device.type != "cuda" or rows.device == self.device:
            yield rows
            return
        staged = self.buffer("host", rows.dtype, rows.numel(), pinned=True).view(rows.shape)
        staged.copy_(rows)
        target = self.buffer("weight", rows.dtype, rows.numel()).view(rows.shape)
        target.copy_(staged, non_blocking=True)
        yield target
        staged.copy_(target, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        rows.copy_(staged)


# One set per thread: a Ray worker runs one task at a time on one thread; `--executor local` runs
# several tasks at once on threads of one process, and each must have buffers of its own.
_WORKSPACES = threading.local()


def workspace_for(device: str | torch.device) -> Workspace:
    """This thread's workspace for a device, kept between tasks (Ray reuses worker processes)."""
    device = torch.device(device)
    kept = _WORKSPACES.__dict__.setdefault("by_device", {})
    return kept.setdefault(str(device), Workspace(device))


def resolve_device(requested: str, gpu_assigned: bool) -> str:
    """The torch device for a worker: CUDA when it was given a GPU it can see, else the CPU."""
    if requested == "cpu" or not gpu_assigned:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        raise RuntimeError("this worker was given a GPU but torch here cannot use CUDA; "
                           "install a CUDA build of torch on the workers or use --device cpu")
    return "cpu"  # auto on a node whose GPU torch cannot drive (e.g. a logical GPU)
