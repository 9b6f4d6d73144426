"""Metrics of boxes and runtimes, with real values.

Host side: the QEMU process's CPU time (``/proc/PID/stat`` utime + stime) and resident memory
(``/proc/PID/status`` VmRSS). Guest side: ``/proc/meminfo`` read through the agent. CPU use is a
rate, so it is measured between two samples: the previous ``metrics()`` call, or a short window.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

_TICKS = os.sysconf("SC_CLK_TCK")
#: Window of the first CPU sample of a box (no previous sample to compare with).
CPU_WINDOW = 0.25


@dataclass(frozen=True)
class BoxMetrics:
    commands: int  # processes started in the box by this process
    errors: int  # exec/spawn calls that failed (could not start, timed out, broke)
    total_create_ms: float | None  # start() → agent ready, image resolution included
    guest_boot_ms: float | None  # guest kernel start → agent ready (the guest's clock)
    image_ms: float | None  # resolving (or pulling) the image
    cpu_percent: float  # QEMU's CPU use since the previous sample (100 = one host core)
    memory_bytes: int  # guest memory in use: MemTotal - MemAvailable
    memory_total_bytes: int  # guest RAM as the guest kernel sees it
    qemu_rss_bytes: int  # host memory the QEMU process holds


@dataclass(frozen=True)
class RuntimeMetrics:
    boxes_created: int  # by this runtime
    boxes_failed: int  # this runtime's boxes that failed to start or failed while running
    running: int  # boxes running in the home (all processes)
    commands: int  # commands started by this runtime's boxes
    errors: int  # failed exec/spawn calls of this runtime's boxes


def qemu_cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


def qemu_rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def parse_meminfo(text: str) -> tuple[int, int]:
    """(total, in use) bytes from a guest's /proc/meminfo (untrusted: bounded, defaults 0)."""
    values: dict[str, int] = {}
    for line in text.splitlines()[:200]:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit() and len(parts[0]) < 20:
            values[name] = int(parts[0]) * 1024
    total = values.get("MemTotal", 0)
    available = min(values.get("MemAvailable", total), total)
    return total, total - available


class CpuSampler:
    """CPU use of a process between successive calls."""

    def __init__(self) -> None:
        self._last: tuple[float, float] | None = None

    def sample(self, pid: int) -> tuple[float, float] | None:
        cpu = qemu_cpu_seconds(pid)
        return None if cpu is None else (time.monotonic(), cpu)

    def percent(self, before: tuple[float, float], after: tuple[float, float]) -> float:
        wall = after[0] - before[0]
        return max(0.0, (after[1] - before[1]) / wall * 100.0) if wall > 0 else 0.0


__all__ = [
    "CPU_WINDOW",
    "BoxMetrics",
    "CpuSampler",
    "RuntimeMetrics",
    "parse_meminfo",
    "qemu_cpu_seconds",
    "qemu_rss_bytes",
]
