"""Read-ahead and write-behind: order kept, concurrency used, memory bounded, failures surfaced."""

from __future__ import annotations

import os
import threading
import time

import pytest

from merge_core.io.local import LocalStorage
from merge_core.io.pipeline import Behind, Item, Read, Window, read_ahead


class SlowCountingStorage(LocalStorage):
    """A real local storage whose reads take a while, recording how many bytes were in flight."""

    def __init__(self, root: str):
        super().__init__(root)
        self.lock = threading.Lock()
        self.in_flight = self.peak_bytes = self.peak_reads = self.reads = 0

    def read_into(self, name: str, offset: int, view: memoryview) -> None:
        length = len(view)
        with self.lock:
            self.in_flight += length
            self.reads += 1
            self.peak_bytes = max(self.peak_bytes, self.in_flight)
            self.peak_reads = max(self.peak_reads, self.reads)
        time.sleep(0.01)
        try:
            super().read_into(name, offset, view)
        finally:
            with self.lock:
                self.in_flight -= length
                self.reads -= 1


@pytest.fixture
def storage(tmp_path):
    (tmp_path / "blob").write_bytes(os.urandom(1 << 20))
    return SlowCountingStorage(str(tmp_path))


def test_items_arrive_in_order_with_reads_split_and_joined(storage):
    blob = open(os.path.join(storage.root, "blob"), "rb").read()
    items = [Item(i, (Read(storage, "blob", i * 10_000, 10_000 + i), Read(storage, "blob", 900_000, 7)))
             for i in range(40)]
    got = list(read_ahead(items, chunk=4096, ahead_bytes=64_000, threads=4))
    assert [tag for tag, _ in got] == list(range(40))
    for tag, (first, second) in got:
        assert bytes(first) == blob[tag * 10_000: tag * 10_000 + 10_000 + tag] and second == blob[900_000:900_007]
    assert storage.peak_reads > 1, "several ranged reads were in flight at once"


def test_read_ahead_stays_within_its_byte_budget(storage):
    items = [Item(i, (Read(storage, "blob", i * 8192, 8192),)) for i in range(100)]
    for _ in read_ahead(items, chunk=8192, ahead_bytes=32_768, threads=8):
        time.sleep(0.002)
    assert storage.peak_bytes <= 32_768


def test_an_item_larger_than_the_budget_still_goes(storage):
    items = [Item("big", (Read(storage, "blob", 0, 1 << 20),))]
    ((tag, (data,)),) = list(read_ahead(items, chunk=1 << 16, ahead_bytes=1000))
    assert tag == "big" and len(data) == 1 << 20


def test_behind_runs_in_order_and_reports_the_first_failure():
    seen = []
    behind = Behind("test", max_bytes=10)
    for value in (b"a", b"bb", b"ccc"):
        behind.submit(seen.append, value)
    behind.drain()
    assert seen == [b"a", b"bb", b"ccc"]

    def fail(data):
        raise OSError("disk full")
    behind.submit(fail, b"x")
    behind.submit(seen.append, b"never")
    with pytest.raises(OSError, match="disk full"):
        behind.drain()
    assert seen[-1] == b"ccc", "calls after a failure are skipped"
    behind.close()


def test_shared_reads_are_fetched_once_while_kept(storage):
    """Items that read the same read-only range (one lora_B for many experts) share one fetch; a range
    evicted from the kept window is fetched again; unshared reads are always fetched."""
    blob = open(os.path.join(storage.root, "blob"), "rb").read()
    fetched = []
    original = storage.read_into

    def counting(name, offset, view):
        fetched.append((offset, len(view)))
        original(name, offset, view)

    storage.read_into = counting
    common = Read(storage, "blob", 500_000, 4096, shared=True)
    items = [Item(i, (Read(storage, "blob", i * 1000, 1000), common)) for i in range(20)]
    items.append(Item("other", (Read(storage, "blob", 0, 1000), Read(storage, "blob", 500_000, 4096))))
    got = list(read_ahead(items, chunk=8192, ahead_bytes=64_000, threads=4))
    assert all(bytes(data[1]) == blob[500_000:504_096] for _, data in got)
    assert fetched.count((500_000, 4096)) == 2, "once shared, once for the unshared read of the same range"

    fetched.clear()
    evicting = [Item(i, (Read(storage, "blob", 0, 1000), Read(storage, "blob", (i % 2) * 300_000, 40_000,
                                                                  shared=True))) for i in range(4)]
    for _ in read_ahead(evicting, chunk=1 << 16, ahead_bytes=50_000, threads=1):
        pass
    assert fetched.count((0, 40_000)) == 2 and fetched.count((300_000, 40_000)) == 2, "evicted, then fetched again"


def test_behinds_sharing_a_window_hold_at_most_its_bytes_together_and_give_back_what_they_never_ran():
    """The writers of a batch's outputs share one window: what they hold together stays within it (one
    call always goes); a Behind closed with calls still queued gives their bytes back, so that the
    others are not left waiting for room that never comes."""
    window = Window(max_bytes=10)
    gate = threading.Event()
    held = []
    first, second = Behind("a", window=window), Behind("b", window=window)
    first.submit(lambda data: gate.wait(5), b"x" * 6)  # runs, and holds its 6 bytes until the gate opens
    first.submit(held.append, b"y" * 4)  # queued: 10 bytes held, the window is full
    waiting = threading.Thread(target=lambda: second.submit(held.append, b"z" * 3))
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive(), "no room for 3 more bytes while 10 are held"
    gate.set()
    waiting.join(5)
    assert not waiting.is_alive()
    second.drain()
    first.drain()
    assert held == [b"y" * 4, b"z" * 3]

    gate.clear()
    first.submit(lambda data: gate.wait(5), b"x" * 2)  # running
    first.submit(held.append, b"n" * 7)  # queued behind it
    closing = threading.Thread(target=first.close)  # cancels the queued call, waits for the running one
    closing.start()
    time.sleep(0.1)
    gate.set()
    closing.join(5)
    late = threading.Thread(target=lambda: (second.submit(held.append, b"q" * 10), second.drain()))
    late.start()
    late.join(5)
    assert not late.is_alive(), "the cancelled call's bytes came back to the window"
    second.close()
    assert held[-1] == b"q" * 10 and b"n" * 7 not in held
