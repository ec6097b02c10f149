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
from merge_core.errors import TransientStorageError

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
    import merge_core.worker.shard_merge  # noqa: F401  (torch with it)
    import merge_core.publish.finalize  # noqa: F401


class LocalExecutor(InProcessExecutor):
    """`--executor local`: each task on a thread of this process, as many at once as the driver's
    lanes of this machine's cores allow (the fuse, the hashes and the I/O release the GIL). Each task
    takes `num_cpus` of torch's threads, as a Ray task would. Stopped, the running tasks end at their
    next tensor (a thread cannot be killed) and cancel() returns once they have, so that nothing
    they write appears after the driver has cleaned up."""
    name = "local"
    NODE = "local"

    def __init__(self) -> None:
        self._threads: futures.ThreadPoolExecutor | None = None
        self._stop = threading.Event()
        # What a Ray worker preloads: torch and the worker's modules, imported beside the driver's planning.
        threading.Thread(target=_import_worker, name="lora-merge-preload", daemon=True).start()

    def start(self) -> None:
        self._stop.clear()
        if self._threads is None:
            self._threads = futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                                       thread_name_prefix="lora-merge-task")

    def nodes(self) -> list[dict]:
        return [dict(node, NodeID=self.NODE) for node in super().nodes()]

    def submit(self, work: Callable, args: tuple, options: dict) -> Future:
        where = Placement(self.NODE, int(options.get("num_cpus") or 1), stop=self._stop)
        return self._threads.submit(work, *args, where)

    def wait(self, handles: Sequence[Future], timeout: float) -> list[Future]:
        done, _ = futures.wait(handles, timeout=timeout, return_when=futures.FIRST_COMPLETED)
        return [h for h in handles if h in done][:1]

    def cancel(self, handles: Sequence[Future]) -> None:
        self._stop.set()
        futures.wait(handles)

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=True)
            self._threads = None
