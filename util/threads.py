"""CPU threads for machines the tools share: with another job, a scheduler's slice, other ranks.

Three things make a busy neighbour cost far more than its share of the cores:
- OpenMP threads that spin while they wait. libgomp (PyTorch's OpenMP on Linux) busy-waits
  300,000 rounds at every parallel region's barrier before it sleeps; when the thread it waits
  for has lost its core to another process, the spinning burns the time that thread needed.
  Measured on 2 cores beside other jobs (PSPNet-18, 3 toy images, 3 scales + flip): 35-80 s as
  shipped, 10-13 s with GOMP_SPINCOUNT 0 or 1000, 19 s at 10,000, 34 s at 50,000. `openmp_defaults`
  shortens the spin unless the user chose a wait policy; it must reach the environment before
  libgomp loads, i.e. before `import torch`: tools call `set_openmp_defaults()` first.
- Thread counts from the machine instead of the process: PyTorch starts one thread per CPU in
  the affinity mask, blind to a cgroup quota (`docker --cpus`, a scheduler's limit), and every
  process on a node does so. `usable_cores` counts what this process may run on.
- Thread pools inside data workers: OpenCV starts one thread per CPU in every worker, on top of
  the main process's threads; workers run one sample at a time, single-threaded (as mmcv does).

User settings win: OMP_NUM_THREADS / MKL_NUM_THREADS keep PyTorch's own thread count,
OMP_WAIT_POLICY / GOMP_SPINCOUNT keep the wait behaviour, SEMSEG_FORCE_WORKERS=1 keeps the
configured data workers. The `set_`/`init_` functions apply the plan; the others are functions
of their arguments (the cores default to the live process's).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping

# Spin rounds before an idle OpenMP thread sleeps (tens of microseconds): long enough to catch the
# next parallel region of a quiet run, short enough not to hold a core another process could use.
SPIN_COUNT = "1000"
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
FORCE_WORKERS = "SEMSEG_FORCE_WORKERS"
CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs' worth of time the cgroup quota allows (cgroup v2 cpu.max, else v1 cpu.cfs_quota_us /
    cpu.cfs_period_us under <root>/cpu or <root>/cpu,cpuacct), or None without a quota."""
    candidates = [(root / "cpu.max", None)] + [(root / d / "cpu.cfs_quota_us", root / d / "cpu.cfs_period_us")
                                               for d in ("cpu", "cpu,cpuacct")]
    for quota_file, period_file in candidates:
        try:
            fields = quota_file.read_text().split()
            if period_file is not None:
                fields.append(period_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if len(fields) < 2 or fields[0] in ("max", "-1"):
            return None
        try:
            quota, period = float(fields[0]), float(fields[1])
        except ValueError:
            return None
        return quota / period if quota > 0 and period > 0 else None
    return None


def usable_cores(affinity: set[int] | None = None, quota: float | None = None) -> int:
    """The cores this process may use: its CPU affinity mask (taskset, a scheduler's cpuset),
    lowered to a cgroup CPU quota rounded up. Defaults to the live process's values."""
    if affinity is None:
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    if quota is None:
        quota = cgroup_cpu_limit()
    cores = len(affinity)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def openmp_defaults(env: Mapping[str, str]) -> dict[str, str]:
    """Variables to add to the environment before OpenMP loads: a short spin, unless the user
    set a wait policy or spin count."""
    if any(env.get(name) for name in WAIT_VARIABLES):
        return {}
    return {"GOMP_SPINCOUNT": SPIN_COUNT}


def intra_op_threads(env: Mapping[str, str], cores: int, local_processes: int) -> int | None:
    """PyTorch intra-op threads of one process: the cores per process on this node, or None to
    leave the user's OMP_NUM_THREADS / MKL_NUM_THREADS in charge (PyTorch reads them itself)."""
    if any(env.get(name) for name in THREAD_VARIABLES):
        return None
    return max(1, cores // max(1, local_processes))


def capped_workers(asked: int, cores: int, env: Mapping[str, str], key: str) -> tuple[int, str | None]:
    """(data workers to start, notice line or None): at most one worker per usable core, since a
    worker beyond that only queues for a core (and holds its memory); SEMSEG_FORCE_WORKERS=1
    keeps the asked number."""
    if asked <= cores or env.get(FORCE_WORKERS, "") not in ("", "0"):
        return asked, None
    return cores, (f"{key} gives this process {asked} data workers, but it may use {cores} CPU core(s); "
                   f"starting {cores} (set {FORCE_WORKERS}=1 to start {asked})")


def set_openmp_defaults() -> None:
    """Apply openmp_defaults to os.environ; call before `import torch` (a no-op once libgomp is loaded)."""
    for name, value in openmp_defaults(os.environ).items():
        os.environ.setdefault(name, value)


def set_process_threads(local_processes: int = 1) -> int:
    """Intra-op threads of PyTorch and OpenCV for this process's cores; returns PyTorch's count."""
    import cv2
    import torch
    threads = intra_op_threads(os.environ, usable_cores(), local_processes)
    if threads is not None:
        torch.set_num_threads(threads)
    cv2.setNumThreads(torch.get_num_threads())
    return torch.get_num_threads()


def init_data_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: one sample at a time on one thread (PyTorch already sets its own
    threads to 1 in workers; OpenCV would start a pool per worker)."""
    import cv2
    cv2.setNumThreads(0)  # 0: OpenCV runs its functions sequentially, without a pool
