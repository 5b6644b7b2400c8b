"""CPU seconds of process trees, from /proc: where a benchmark's time went, per process.

Linux only; elsewhere every figure is None (a benchmark reports rates without the split).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> list[str] | None:
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # the command name may hold spaces and ")"


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants alive now."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, stack = [], [pid]
    while stack:
        current = stack.pop()
        tree.append(current)
        stack.extend(children.get(current, []))
    return tree


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds the processes have used so far (gone ones count 0)."""
    total = 0
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / _TICKS


@dataclass(frozen=True)
class CpuSplit:
    """CPU milliseconds per item by process, and the cores all of them kept busy."""

    server_ms: float
    store_ms: float  # a Milvus server's processes (0 for Lite: it runs in the server's tree)
    client_ms: float
    cores: float

    def to_dict(self) -> dict[str, float]:
        return {key: round(value, 3) for key, value in vars(self).items()}


def measure_cpu(
    items: int, server_pid: int, store_pid: int | None, work: Callable[[], None]
) -> CpuSplit | None:
    """Run `work` and split the CPU it caused over the server, the store and this process;
    None where /proc is not there."""
    if not PROC.is_dir():
        work()
        return None
    server = process_tree(server_pid)  # the tree before: Lite's process is started by then
    store = process_tree(store_pid) if store_pid is not None else []
    before = cpu_seconds(server), cpu_seconds(store), time.process_time()
    started = time.perf_counter()
    work()
    wall = time.perf_counter() - started
    used = (
        cpu_seconds(server) - before[0],
        cpu_seconds(store) - before[1],
        time.process_time() - before[2],
    )
    server_ms, store_ms, client_ms = (1000 * seconds / max(items, 1) for seconds in used)
    return CpuSplit(server_ms, store_ms, client_ms, cores=sum(used) / wall if wall > 0 else 0.0)
