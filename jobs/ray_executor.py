"""The Ray executor (the default, --executor ray): one Ray task per unit of work, on the cluster
given (--ray-address) or on a local Ray started for the job.

Tasks run with max_retries=0: retries are the driver's (jobs/runner.py), which tells transient
failures from bad input. And with max_calls=0: Ray would otherwise end a worker after each task
that asked for a GPU, so every GPU shard would pay a new process, torch's import and CUDA's start
again; a kept worker also keeps its buffers (merge_core.numerics.workspace).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, Callable, Sequence

import ray
from ray import exceptions as ray_errors

from jobs.executor import STORAGE_TRANSIENT
from jobs.tasks import Placement, finalize_work, merge_outputs_work, merge_shard_work, verify_shard_work
from merge_core.errors import InputError
from merge_core.publish.journal import PAUSE_ENV

# The driver never puts tensors in Ray's object store, so a local cluster needs only a little.
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024
# A Ray started for one job: its workers start as the job does (not when the first shard is
# submitted) and import torch before they take work, so that both happen while the driver plans.
# (A cluster of your own takes the same settings: RAY_preload_python_modules=torch and
# RAY_enable_worker_prestart=true in the environment of `ray start`.)
LOCAL_SYSTEM_CONFIG = {"preload_python_modules": ["torch"], "enable_worker_prestart": True}
CANCEL_WAIT_SECONDS = 10  # how long a cancelled task may take to die before the output is cleaned
# How long the cluster's address may take to answer before the job says so (ray.init itself
# retries a dead address for minutes, behind lines of its own).
CONNECT_TIMEOUT_SECONDS = 10


def _placement() -> Placement:
    context = ray.get_runtime_context()
    cpus = int(context.get_assigned_resources().get("CPU", 1))
    return Placement(context.get_node_id(), max(1, cpus), bool(ray.get_gpu_ids()))


# One Ray task per kind of work, named for it (a worker's process title is ray::<name>).
@ray.remote(max_retries=0, max_calls=0)
def merge_shard_task(*args):
    return merge_shard_work(*args, _placement())


@ray.remote(max_retries=0, max_calls=0)
def merge_outputs_task(*args):
    return merge_outputs_work(*args, _placement())


@ray.remote(max_retries=0, max_calls=0)
def verify_shard_task(*args):
    return verify_shard_work(*args, _placement())


@ray.remote(max_retries=0)
def finalize_task(*args):
    return finalize_work(*args, _placement())


REMOTE = {merge_shard_work: merge_shard_task, merge_outputs_work: merge_outputs_task,
          verify_shard_work: verify_shard_task, finalize_work: finalize_task}


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_SECONDS) -> None:
    """Refuse, with one line, a cluster address nothing answers at: `auto` (or RAY_ADDRESS) naming
    a cluster that is gone, or a host:port with no Ray behind it."""
    fix = ("start the cluster (ray start --head), pass the address of a running one, or leave --ray-address out to "
           "start a local Ray for this job")
    try:
        from ray._private.services import get_ray_address_from_environment
    except ImportError:  # Ray moved it: ray.init will say what it finds
        return
    try:
        resolved = get_ray_address_from_environment(address, None)
    except ConnectionError:
        raise InputError(f"--ray-address {address}", "no running Ray cluster was found on this machine", fix) from None
    if not resolved or resolved in ("local", "auto"):
        return
    host, _, port = resolved.split("://", 1)[-1].rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError):
        told = "" if resolved == address else f" (where {address} leads)"
        raise InputError(f"--ray-address {address}", f"no Ray cluster answers at {resolved}{told} within "
                         f"{timeout:g} s", fix) from None


def connect(address: str | None) -> None:
    """Join the cluster at `address`, or start a local Ray for this job; a Ray this process already
    joined (a user's script, a notebook) is used as it is."""
    if ray.is_initialized():
        return
    if address:
        check_reachable(address)
    # Tests only: a pause point reaches the tasks too (a running cluster's workers do not inherit
    # the driver's environment).
    hooks = {"runtime_env": {"env_vars": {PAUSE_ENV: os.environ[PAUSE_ENV]}}} if PAUSE_ENV in os.environ else {}
    if address:
        ray.init(address=address, logging_level=logging.WARNING, **hooks)
    else:
        # "local": a new Ray for this job, never silently a cluster that `ray start` left on this machine.
        # It listens on loopback for this process alone: no token to set up (and warn about).
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 logging_level=logging.WARNING, _system_config=LOCAL_SYSTEM_CONFIG, **hooks)


class RayExecutor:
    name = "ray"
    # Besides the store: the worker or node under the task.
    transient = STORAGE_TRANSIENT + (
        ray_errors.WorkerCrashedError, ray_errors.NodeDiedError, ray_errors.ObjectLostError,
        ray_errors.OwnerDiedError, ray_errors.RaySystemError, ray_errors.LocalRayletDiedError,
        ray_errors.OutOfMemoryError)

    def __init__(self, address: str | None = None):
        self.address = address

    def start(self) -> None:
        connect(self.address)

    def nodes(self) -> list[dict]:
        return ray.nodes()

    def resources(self) -> dict:
        return ray.cluster_resources()

    def submit(self, work: Callable, args: tuple, options: dict) -> ray.ObjectRef:
        return REMOTE[work].options(**options).remote(*args)

    def wait(self, handles: Sequence[ray.ObjectRef], timeout: float) -> list:
        done, _ = ray.wait(list(handles), num_returns=1, timeout=timeout)
        return done

    def get(self, handle: ray.ObjectRef) -> Any:
        return ray.get(handle)

    def cancel(self, handles: Sequence[ray.ObjectRef]) -> None:
        """Kill the tasks and wait (briefly) until they are gone, so that nothing they were writing
        can appear after the caller has cleaned up the output. Only the unfinished ones: a cancel
        racing a task's completion can crash Ray's own driver code (RAY_CHECK "Tried to complete task
        that was not pending", ray-project/ray#54846), so the window is kept as small as it can be."""
        if not handles:
            return
        _, running = ray.wait(list(handles), num_returns=len(handles), timeout=0)
        for ref in running:
            ray.cancel(ref, force=True)
        if running:
            ray.wait(running, num_returns=len(running), timeout=CANCEL_WAIT_SECONDS)
