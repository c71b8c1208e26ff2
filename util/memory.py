"""Host memory of a process and of its children (the data-loader workers), read from /proc.

Linux only; elsewhere the readings are None. A forked worker's resident set also counts the pages
it shares with the trainer, so adding the workers to the trainer overstates the machine's total.
"""
from __future__ import annotations

from pathlib import Path


def status_mib(pid: int | str, field: str) -> float | None:
    """A memory field of /proc/<pid>/status in MiB: VmRSS (now) or VmHWM (peak); None if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def child_pids(pid: int | str = "self") -> list[int]:
    """The live children of a process (all its threads' children), e.g. DataLoader workers."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(p) for p in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return sorted(set(children))


def children_peak_mib(pid: int | str = "self") -> list[float]:
    """Peak resident memory (VmHWM) of each live child, in MiB."""
    peaks = (status_mib(child, "VmHWM") for child in child_pids(pid))
    return [peak for peak in peaks if peak is not None]
