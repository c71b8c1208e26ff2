"""Stopping a training run on request at an iteration that every process agrees on.

SLURM ends a job (time limit, preemption) with SIGTERM, or with SIGUSR1 ahead of time under
`--signal=USR1@<seconds>`; torchrun passes SIGTERM and SIGINT on to its workers; Ctrl-C sends
SIGINT to every process of the terminal. A signal here only sets a flag. The training loop
finishes the iteration it is in, then `StopRequest.agreed()` takes the largest flag over all
processes (one all_reduce of two integers on a CPU group: no GPU synchronisation), so that every
process stops after the same iteration even when only one of them was signalled; rank 0 then
saves that exact point.

Exit statuses (docs/training.md): STOPPED_STATUS (75, EX_TEMPFAIL: "try again") after SIGTERM or
SIGUSR1, 130 after SIGINT, as for any interrupted command; both after the checkpoint is written.
Outside the training iterations (start-up, validation) a Ctrl-C interrupts at once, as before,
and a request nobody acted on (a KeyboardInterrupt swallowed inside a finaliser) still ends the
run with its status once training is done: a signal is never lost.

Also the time-based mid-epoch checkpoint schedule (CheckpointTimer, with an injectable clock)
and a test hook that pauses the run at a given iteration, so that tests signal it at a point
they control instead of racing it.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

STOPPED_STATUS = 75  # EX_TEMPFAIL: stopped on request after saving; the same command continues
INTERRUPTED_STATUS = 130  # Ctrl-C, as a shell reports it
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
PAUSE_VARIABLE = "SEMSEG_TEST_PAUSE_AT"  # "<iteration>:<folder>", tests only (see pause_for_test)
RELEASED = "go"


class StopRequest:
    """The stop flag of this process (the first signal's number, 0 = none) and the agreement on it."""

    def __init__(self) -> None:
        self.signum = 0
        self.deferring = False  # inside the training iterations: a Ctrl-C waits for the iteration's end
        self._group = None

    def install(self, distributed: bool) -> "StopRequest":
        """Handle the stop signals in this process; with a process group, every rank must call this
        at the same point (it creates the CPU group the agreement runs on)."""
        if distributed:  # gloo sums on the CPU: no device sync, whatever the training backend
            self._group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        first = self.signum == 0
        self.signum = self.signum or signum
        if signum == signal.SIGINT and (not self.deferring or not first):  # a second Ctrl-C is not deferred
            raise KeyboardInterrupt

    def agreed(self, checkpoint_due: bool = False) -> tuple[int, bool]:
        """(the signal any process received, the largest number, or 0; whether any process's clock says
        a checkpoint is due), the same on every process at the same iteration: one all_reduce."""
        if self._group is None:
            return self.signum, checkpoint_due
        flags = torch.tensor([self.signum, int(checkpoint_due)], dtype=torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        return int(flags[0]), bool(flags[1])


def exit_status(signum: int) -> int:
    return INTERRUPTED_STATUS if signum == signal.SIGINT else STOPPED_STATUS


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class CheckpointTimer:
    """Says when a mid-epoch checkpoint is due: `minutes` after the last save (0: never). The clock
    is injectable so that tests can set the time instead of waiting for it."""

    def __init__(self, minutes: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = 60.0 * minutes
        self.clock = clock
        self.last = clock()

    def due(self) -> bool:
        return self.seconds > 0 and self.clock() - self.last >= self.seconds

    def restart(self) -> None:
        self.last = self.clock()


def pause_for_test(iteration: int, rank: int, signalled: Callable[[], bool]) -> None:
    """With SEMSEG_TEST_PAUSE_AT=<k>:<folder>, after iteration k write <folder>/paused-rank<r> (this
    process's id) and wait until this process gets a stop signal or a test writes `go` into that
    file: the test signals at a known iteration, and a signalled process never goes on without its
    flag. A marker that exists is not paused on again (a restarted group passes it)."""
    setting = os.environ.get(PAUSE_VARIABLE)
    if not setting:
        return
    at, folder = setting.split(":", 1)
    marker = Path(folder) / f"paused-rank{rank}"
    if iteration != int(at) or marker.exists():
        return
    marker.write_text(str(os.getpid()))
    deadline = time.monotonic() + 120
    while not signalled() and marker.read_text() != RELEASED and time.monotonic() < deadline:
        time.sleep(0.01)
