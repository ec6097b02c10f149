"""Wall time and peak memory of a command's whole process tree (Ray's daemons and workers included).

Memory is the sum of PSS (proportional set size) over the tree, sampled every 50 ms: shared
pages (torch's libraries, Ray's object store) count once, split among their users, rather
than once per process as RSS would count them.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass

SAMPLE_SECONDS = 0.05


@dataclass(frozen=True)
class Measured:
    seconds: float
    peak_bytes: int
    returncode: int
    output: str


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_pss(root: int) -> int:
    children = _children_map()
    total, stack, seen = 0, [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += _pss(pid)
        stack.extend(children.get(pid, []))
    return total


def measure(command: list[str], env: dict | None = None, cwd: str | None = None) -> Measured:
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                               start_new_session=True)
    peak = 0
    output: list[bytes] = []
    reader = threading.Thread(target=lambda: output.append(process.stdout.read()), daemon=True)
    reader.start()
    while process.poll() is None:
        peak = max(peak, tree_pss(process.pid))
        time.sleep(SAMPLE_SECONDS)
    seconds = time.perf_counter() - started
    reader.join()
    # Ray's daemons outlive the driver by a moment; they were counted while it ran.
    return Measured(seconds, peak, process.returncode, b"".join(output).decode(errors="replace"))
