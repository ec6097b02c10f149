"""The worker's pipeline: reads run ahead of the fuse, hashing and writing run behind it.

Read ahead: byte ranges fetched several at a time, handed over in order, memory bounded.
A shard is consumed in file order, but object stores give their bandwidth to many requests in
flight, not to one long one. Each item (a run of untouched tensors, or a tensor to fuse with
its adapter factors) is cut into ranged reads of at most `chunk` bytes; reads are issued ahead
of the consumer until `ahead_bytes` are outstanding, so while one tensor is fused or written
the next ones are already arriving.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import KW_ONLY, dataclass
from typing import Callable, Generic, Iterator, Sequence, TypeVar

import numpy

from merge_core.io.storage import Storage

DEFAULT_CHUNK_BYTES = 16 * 1024 * 1024
DEFAULT_AHEAD_BYTES = 128 * 1024 * 1024
DEFAULT_THREADS = 6

Tag = TypeVar("Tag")


@dataclass(frozen=True)
class Read:
    storage: Storage
    name: str
    offset: int
    length: int
    _: KW_ONLY
    # Read-only bytes that later items read again (the same adapter factor for many experts):
    # fetched once while recent, and the one buffer handed to each.
    shared: bool = False

    @property
    def key(self) -> tuple:
        return self.storage, self.name, self.offset, self.length


@dataclass(frozen=True)
class Item(Generic[Tag]):
    tag: Tag  # what the consumer needs to know about this item
    reads: tuple[Read, ...]

    @property
    def nbytes(self) -> int:
        return sum(r.length for r in self.reads)


def _buffer(length: int) -> memoryview:
    """A writable buffer whose pages are first touched by the read that fills it (bytearray(n)
    would zero it first: a second pass over memory the read is about to overwrite)."""
    return memoryview(numpy.empty(length, dtype=numpy.uint8))


class _Pending:
    def __init__(self, item: Item, buffers: list[memoryview], futures: list[Future]):
        self.item = item
        self.buffers = buffers  # one per read, filled in place by its chunks' futures
        self.futures = futures

    def result(self) -> list[memoryview]:
        for future in self.futures:
            future.result()
        return self.buffers


def read_ahead(items: Sequence[Item[Tag]], chunk: int = DEFAULT_CHUNK_BYTES, ahead_bytes: int = DEFAULT_AHEAD_BYTES,
               threads: int = DEFAULT_THREADS) -> Iterator[tuple[Tag, list[memoryview]]]:
    """Yield (tag, [bytes of each read]) for every item, in order.

    At least one item is always in flight, so an item larger than `ahead_bytes` still goes.
    Shared reads are kept, up to `ahead_bytes` of them, and not read again while kept.
    """
    with ThreadPoolExecutor(threads, thread_name_prefix="read-ahead") as pool:
        window: deque[_Pending] = deque()
        in_flight = 0
        kept: OrderedDict[tuple, tuple[memoryview, list[Future]]] = OrderedDict()
        kept_bytes = 0

        def issue(read: Read) -> tuple[memoryview, list[Future]]:
            nonlocal kept_bytes
            if read.shared and read.key in kept:
                kept.move_to_end(read.key)
                return kept[read.key]
            buffer = _buffer(read.length)
            issued = buffer, [pool.submit(read.storage.read_into, read.name, read.offset + start,
                                          buffer[start:start + chunk]) for start in range(0, read.length, chunk)]
            if read.shared:
                kept[read.key] = issued
                kept_bytes += read.length
                while kept_bytes > ahead_bytes and len(kept) > 1:
                    kept_bytes -= len(kept.popitem(last=False)[1][0])
            return issued

        upcoming = iter(items)
        next_item = next(upcoming, None)
        try:
            while window or next_item is not None:
                while next_item is not None and (not window or in_flight + next_item.nbytes <= ahead_bytes):
                    issued = [issue(r) for r in next_item.reads]
                    buffers = [buffer for buffer, _ in issued]
                    futures = [future for _, reads in issued for future in reads]
                    window.append(_Pending(next_item, buffers, futures))
                    in_flight += next_item.nbytes
                    next_item = next(upcoming, None)
                pending = window.popleft()
                data = pending.result()
                in_flight -= pending.item.nbytes
                yield pending.item.tag, data
        finally:
            for pending in window:
                for future in pending.futures:
                    future.cancel()


def sha256_of(storage: Storage, name: str, size: int) -> str:
    """sha256 of the first `size` bytes of an object, read with read-ahead."""
    digest = hashlib.sha256()
    for _, (data,) in read_ahead([Item(None, (Read(storage, name, start, min(DEFAULT_CHUNK_BYTES, size - start)),))
                                  for start in range(0, size, DEFAULT_CHUNK_BYTES)]):
        digest.update(data)
    return digest.hexdigest()


class Window:
    """A budget of bytes that calls queued behind the caller may hold. One per Behind by default;
    several Behinds may share one (the writers of every output a task writes), so that what they
    hold together stays bounded however many there are. A call always goes when nothing is
    queued, so one larger than the budget still runs."""

    def __init__(self, max_bytes: int = DEFAULT_AHEAD_BYTES):
        self.max_bytes = max_bytes
        self._queued = 0
        self._room = threading.Condition()

    def take(self, size: int) -> None:
        with self._room:
            self._room.wait_for(lambda: self._queued == 0 or self._queued + size <= self.max_bytes)
            self._queued += size

    def give(self, size: int) -> None:
        with self._room:
            self._queued -= size
            self._room.notify_all()


class Behind:
    """Runs calls one at a time, in submission order, on a thread of its own.

    hashlib and file writes release the GIL, so hashing and writing proceed while the caller
    reads and fuses the next tensor. At most `max_bytes` of submitted data wait at once (or what
    a shared `window` allows), which bounds the memory it holds. After a failure the calls
    still queued are skipped, and the next submit() or drain() raises it.
    """

    def __init__(self, name: str, max_bytes: int = DEFAULT_AHEAD_BYTES, window: Window | None = None):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._window = window if window is not None else Window(max_bytes)
        self._mine = 0  # bytes of this Behind's calls not yet run, given back to the window as they end
        self._lock = threading.Lock()
        self._last: Future | None = None
        self._error: BaseException | None = None

    def submit(self, fn: Callable[[bytes | memoryview], object], data: bytes | memoryview) -> Future:
        """Queue fn(data); the future completes when it has run (or been skipped after a failure)."""
        size = len(data)
        self._window.take(size)
        with self._lock:
            self._mine += size
        if self._error is not None:
            self._release(size)
            raise self._error
        self._last = self._pool.submit(self._run, fn, data, size)
        return self._last

    def _release(self, size: int) -> None:
        with self._lock:
            self._mine -= size
        self._window.give(size)

    def _run(self, fn: Callable[[bytes | memoryview], object], data: bytes | memoryview, size: int) -> None:
        try:
            if self._error is None:
                fn(data)
        except BaseException as exc:
            self._error = exc
        finally:
            self._release(size)

    def drain(self) -> None:
        """Wait for every call (they run in order: the last one finishing means all did)."""
        if self._last is not None:
            self._last.result()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        # Calls cancelled before they ran never gave their bytes back: a shared window would
        # otherwise stay short of them, and the other Behinds on it wait for ever.
        with self._lock:
            left, self._mine = self._mine, 0
        if left:
            self._window.give(left)
