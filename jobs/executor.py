"""Where a job's tasks run: a Ray cluster (jobs/ray_executor.py, the default), or this process.
`--executor local` runs the same task functions on threads of this process, one per lane of this
machine's cores, with no Ray to start or stop: a one-machine merge saves Ray's fixed start-up and
shutdown (about 6 s on two cores) and its daemons' memory, and gives up what only a cluster has
(other machines, GPUs, a worker process per task). The in-process executor runs them one after
another as they are submitted, for the tests of the numerics, the formats and publication.

An executor hands out handles for submitted work and answers the few questions the driver asks:
the cluster's nodes (for lanes and memory checks), which handles are done, their results, and
which failures a second attempt may cure.
"""

from __future__ import annotations

import os
import threading
from concurrent import futures
from concurrent.futures import Future
from typing import Any, Callable, Protocol, Sequence

from jobs.tasks import Placement
from merge_core.errors import Stopped, TransientStorageError

# Failures a second attempt may cure wherever the task ran: the store or the network.
STORAGE_TRANSIENT = (TransientStorageError, ConnectionError, TimeoutError)


class Executor(Protocol):
    name: str
    transient: tuple[type[BaseException], ...]  # failures a retry may cure

    def start(self) -> None: ...

    def nodes(self) -> list[dict]: ...  # as ray.nodes(): NodeID, Alive, Resources {CPU, GPU, memory}

    def resources(self) -> dict: ...  # the cluster's total resources, for the manifest

    def submit(self, work: Callable, args: tuple, options: dict) -> Any: ...

    def wait(self, handles: Sequence[Any], timeout: float) -> list: ...  # at most one finished handle

    def get(self, handle: Any) -> Any: ...

    def cancel(self, handles: Sequence[Any]) -> None: ...  # returns once they are stopped (or briefly waited for)


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


class InProcessExecutor:
    """Runs each task when it is submitted, in this process, on this machine's CPUs. The work and
    its arguments are exactly what Ray would run; only the scheduling is gone."""
    name = "in-process"
    transient = STORAGE_TRANSIENT
    NODE = "in-process"

    def start(self) -> None:
        pass

    def nodes(self) -> list[dict]:
        return [{"NodeID": self.NODE, "Alive": True,
                 "Resources": {"CPU": float(os.cpu_count() or 1), "memory": float(_memory_bytes())}}]

    def resources(self) -> dict:
        return dict(self.nodes()[0]["Resources"])

    def submit(self, work: Callable, args: tuple, options: dict) -> Future:
        future: Future = Future()
        try:
            future.set_result(work(*args, Placement(self.NODE, int(options.get("num_cpus") or 1))))
        except Exception as exc:  # a KeyboardInterrupt goes on up, as it would from ray.get
            future.set_exception(exc)
        return future

    def wait(self, handles: Sequence[Future], timeout: float) -> list[Future]:
        return [h for h in handles if h.done()][:1]

    def get(self, handle: Future) -> Any:
        return handle.result()

    def cancel(self, handles: Sequence[Future]) -> None:
        pass  # nothing runs behind a handle: each task ran to its end when it was submitted


def _import_worker() -> None:
    import merge_core.publish.finalize  # noqa: F401
    import merge_core.worker.shard_merge  # noqa: F401  (torch with it)


def usable_cpus() -> int:
    """The cores this process may run on (its affinity: a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cgroup_memory_bytes() -> int | None:
    """The memory limit of this process's cgroup (v2 `memory.max`, v1 `memory.limit_in_bytes`), if any."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return None


# Of the memory this process may use, what its tasks may take together (Ray's share for tasks
# on a node is about the same); the driver, torch and the page cache live in the rest.
LOCAL_MEMORY_SHARE = 0.7


class LocalExecutor(InProcessExecutor):
    """`--executor local`: each task on a thread of this process, as many at once as the driver's
    lanes of this process's cores allow (the fuse, the hashes and the I/O release the GIL), and no
    more than the memory the tasks ask for (each waits, as a Ray task would, until the tasks before
    it leave room). Each task takes `num_cpus` of torch's threads. Stopped, the running tasks end at
    their next tensor (a thread cannot be killed) and cancel() returns once every task this executor
    started has ended, so that nothing they write appears after the driver has cleaned up. The
    threads are daemons: a second Ctrl-C, which stops the driver at once, does not wait for them.
    One run at a time: a run's cancel() stops every task of the executor."""
    name = "local"
    NODE = "local"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._running: set[Future] = set()
        self._room = threading.Condition()
        usable = [m for m in (_memory_bytes(), _cgroup_memory_bytes()) if m]
        self._memory = int(LOCAL_MEMORY_SHARE * min(usable, default=0))
        self._taken = 0
        # What a Ray worker preloads: torch and the worker's modules, imported beside the driver's planning.
        threading.Thread(target=_import_worker, name="lora-merge-preload", daemon=True).start()

    def start(self) -> None:
        self._stop.clear()

    def nodes(self) -> list[dict]:
        return [{"NodeID": self.NODE, "Alive": True,
                 "Resources": {"CPU": float(usable_cpus()), "memory": float(self._memory)}}]

    def submit(self, work: Callable, args: tuple, options: dict) -> Future:
        where = Placement(self.NODE, int(options.get("num_cpus") or 1), stop=self._stop)
        future: Future = Future()
        with self._room:
            self._running.add(future)
        threading.Thread(target=self._run, args=(future, work, args, where, int(options.get("memory") or 0)),
                         name="lora-merge-task", daemon=True).start()
        return future

    def _run(self, future: Future, work: Callable, args: tuple, where: Placement, memory: int) -> None:
        try:
            self._take(memory)
            try:
                future.set_result(work(*args, where))
            finally:
                self._give(memory)
        except BaseException as exc:
            future.set_exception(exc)
        finally:
            with self._room:
                self._running.discard(future)
                self._room.notify_all()

    def _take(self, memory: int) -> None:
        """Wait for room for `memory` bytes; a task alone may take more (check_fits refused any
        larger than the whole)."""
        with self._room:
            while self._taken and self._taken + memory > self._memory:
                if self._stop.is_set():
                    raise Stopped("the job was stopped before this task began")
                self._room.wait(0.5)
            self._taken += memory

    def _give(self, memory: int) -> None:
        with self._room:
            self._taken -= memory
            self._room.notify_all()

    def wait(self, handles: Sequence[Future], timeout: float) -> list[Future]:
        done, _ = futures.wait(handles, timeout=timeout, return_when=futures.FIRST_COMPLETED)
        return [h for h in handles if h in done][:1]

    def cancel(self, handles: Sequence[Future]) -> None:
        """Stop every task this executor started, the handles given or not (one submitted as the
        signal came may not be among them yet), and return once they have ended."""
        self._stop.set()
        with self._room:
            while self._running:
                self._room.wait(0.5)
