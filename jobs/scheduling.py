"""Where shard tasks run: lanes of task slots drawn from the cluster's nodes.

With GPUs in the cluster and --device auto or cuda, shards are fused on GPUs. The merge is
bound by storage, not by arithmetic, so under auto the CPU-only nodes take shards too: each
gets a lane of CPU tasks pinned (softly) to it, adding its network and disk bandwidth.
The driver submits into a free slot only, so at most one task per slot is ever queued.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from merge_core.errors import InputError


@dataclass
class Lane:
    name: str
    options: dict
    slots: int
    running: int = field(default=0)

    @property
    def free(self) -> bool:
        return self.running < self.slots


# Shard tasks one GPU runs at once: the fuse keeps the GPU busy for milliseconds per tensor, the
# rest of a task is reading, hashing and writing on the host, which several tasks overlap.
TASKS_PER_GPU = 2


def task_cpus_for(nodes: Sequence[Mapping[str, object]], tasks: int) -> int:
    """CPUs per task when the user gave none: one, unless the shards are fewer than the cores, when
    each task takes an equal share of a node (its threads hash, read and fuse beside each other)."""
    cpus = [int(n.get("Resources", {}).get("CPU", 0)) for n in nodes if n.get("Alive")]
    if not cpus or tasks <= 0 or tasks >= sum(cpus):
        return 1
    return max(1, min(max(cpus), sum(cpus) // tasks))


def plan_lanes(nodes: Sequence[Mapping[str, object]], device: str, task_cpus: int | None = 1,
               tasks: int = 0) -> list[Lane]:
    """Lanes for the alive nodes of `ray.nodes()`, each task taking `task_cpus` CPUs (None: sized
    by task_cpus_for from the number of `tasks`)."""
    alive = [n for n in nodes if n.get("Alive")]
    resources = [n.get("Resources", {}) for n in alive]
    gpus = int(sum(r.get("GPU", 0) for r in resources))
    cpus = int(sum(r.get("CPU", 0) for r in resources))
    if device == "cuda" and not gpus:
        raise InputError("--device cuda", "the Ray cluster has no GPUs",
                         "use --device auto or cpu, or add GPU workers to the cluster")
    if device == "cpu" or not gpus:
        if not cpus:
            raise InputError("--ray-address", "the Ray cluster has no CPUs to run tasks on",
                             "add worker nodes with CPUs to the cluster")
        task_cpus = task_cpus or task_cpus_for(alive, tasks)
        return [Lane("cpu", {"num_cpus": task_cpus, "num_gpus": 0}, max(1, cpus // task_cpus))]
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # here: `plan` never loads Ray

    task_cpus = task_cpus or 1
    lanes = [Lane("gpu", {"num_cpus": task_cpus, "num_gpus": 1 / TASKS_PER_GPU}, gpus * TASKS_PER_GPU)]
    if device == "auto":
        for node, res in zip(alive, resources):
            if not res.get("GPU") and res.get("CPU", 0) >= task_cpus:
                strategy = NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=True)
                lanes.append(Lane(f"cpu@{node['NodeID'][:8]}", {"num_cpus": task_cpus, "num_gpus": 0,
                                                                "scheduling_strategy": strategy},
                                  int(res["CPU"]) // task_cpus))
    return lanes


def check_fits(nodes: Sequence[Mapping[str, object]], task) -> None:
    """A task asking more memory than any node has would wait forever: refuse it up front."""
    largest = max((n.get("Resources", {}).get("memory", 0) for n in nodes if n.get("Alive")), default=0)
    if task.memory_bytes > largest:
        raise InputError(task.name, f"merging it needs about {task.memory_bytes / 1e9:.1f} GB of worker memory; the "
                         f"largest node offers {largest / 1e9:.1f} GB", "add larger worker nodes to the Ray cluster, "
                         "or merge on a machine with more memory")


def free_lane(lanes: Sequence[Lane]) -> Lane | None:
    """GPU lanes first: they come first in the list."""
    return next((lane for lane in lanes if lane.free), None)
