"""Preemption and restarts: a signal to torchrun or to one rank stops every process after the same
iteration with a mid-epoch checkpoint of that exact point, and resuming (also in another number of
processes, also by torchrun's --max-restarts after a SIGKILL) ends with an uninterrupted run's
weights. Runs pause at an iteration through the test hook of util/preemption.py, so the signal lands
at a point the test chooses, never in a race with training.

All runs: 8 training images, global batch 4 (2 steps an epoch), 3 epochs, without SyncBatchNorm, so
that one process with 2 accumulation steps computes what 2 processes compute (see test_train.py)."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import CPU_ONLY, REPO_ROOT, write_config
from test_train import assert_same_weights, final_weights
from util.preemption import PAUSE_VARIABLE, RELEASED, STOPPED_STATUS

TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
TRAIN = {"epochs": 3, "print_freq": 2, "sync_bn": False, "checkpoint_minutes": 0}
ITERATIONS_PER_EPOCH = 2


def config(root: Path, toy: Path) -> Path:
    (root / "train8.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "train8.txt").write_text("".join((toy / "train.txt").read_text().splitlines(True)[:8]))
    return write_config(root / "cfg.yaml", toy, DATA={"train_list": str(root / "train8.txt")}, TRAIN=TRAIN)


def start(cfg: Path, *args: str, launcher=TORCHRUN_2, pause: tuple[int, Path] | None = None,
          log: Path | None = None) -> subprocess.Popen:
    """tool/train.py on the CPU, its output into `log`; with pause=(k, folder) every rank waits after
    iteration k until released (see util.preemption.pause_for_test)."""
    env = {**os.environ, **CPU_ONLY, "OMP_NUM_THREADS": "1"}
    if pause is not None:
        pause[1].mkdir(parents=True, exist_ok=True)
        env[PAUSE_VARIABLE] = f"{pause[0]}:{pause[1]}"
    out = open(log or cfg.parent / "run.log", "w")
    return subprocess.Popen([*launcher, str(REPO_ROOT / "tool" / "train.py"), f"--config={cfg}", *args],
                            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def paused_ranks(folder: Path, ranks: int, run: subprocess.Popen) -> dict[int, int]:
    """Wait until every rank has paused; rank -> process id."""
    deadline = time.monotonic() + 240
    markers = [folder / f"paused-rank{rank}" for rank in range(ranks)]
    while not all(m.is_file() and m.read_text() for m in markers):
        assert run.poll() is None, f"the run ended before pausing: {run.returncode}"
        assert time.monotonic() < deadline, "the run did not pause"
        time.sleep(0.05)
    return {rank: int(m.read_text()) for rank, m in enumerate(markers)}


def release(folder: Path) -> None:
    for marker in folder.glob("paused-rank*"):
        marker.write_text(RELEASED)


def finish(run: subprocess.Popen, cfg: Path) -> tuple[int, str]:
    status = run.wait(timeout=300)
    return status, (cfg.parent / "run.log").read_text()


def mid_epoch_files(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.glob("train_epoch_*_step_*.pth"))


@pytest.fixture(scope="session")
def uninterrupted(tiny_toy, tmp_path_factory) -> dict:
    """The final weights of the run every test here is compared with: 2 processes, never stopped."""
    cfg = config(tmp_path_factory.mktemp("uninterrupted"), tiny_toy)
    status, log = finish(start(cfg), cfg)
    assert status == 0, log[-3000:]
    return final_weights(cfg.parent / "model", 3)


def parameters(weights: dict) -> dict:
    """Without BatchNorm's running statistics: DDP keeps rank 0's, which one process does not compute."""
    return {k: v for k, v in weights.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_the_iteration_and_one_process_finishes_the_run(tiny_toy, tmp_path, uninterrupted):
    cfg = config(tmp_path, tiny_toy)
    run = start(cfg, pause=(ITERATIONS_PER_EPOCH + 1, tmp_path / "pause"))  # epoch 2, step 1
    paused_ranks(tmp_path / "pause", 2, run)
    run.send_signal(signal.SIGTERM)  # as SLURM or a user ends torchrun
    time.sleep(0.5)  # torchrun passes it on to its workers from its monitoring loop
    release(tmp_path / "pause")
    status, log = finish(run, cfg)
    model_dir = tmp_path / "model"
    assert status != 0, log[-3000:]
    assert log.count(f"exitcode  : {STOPPED_STATUS}") + log.count(f"exit code {STOPPED_STATUS}") >= 0
    assert "stopped on SIGTERM in epoch 2/3 after step 1/2 (iteration 3)" in log, log[-3000:]
    assert mid_epoch_files(model_dir) == ["train_epoch_2_step_1.pth"]
    assert not (model_dir / "train_epoch_2.pth").exists()
    hint = re.search(r"to continue from it, run: (.+)", log)
    assert hint and "TRAIN.resume auto" in hint.group(1), log[-3000:]

    # one process, two accumulation steps: the same global batches, the same arithmetic
    resumed = start(cfg, "TRAIN.resume", "auto", "TRAIN.accum_steps", "2", launcher=[sys.executable])
    status, log = finish(resumed, cfg)
    assert status == 0, log[-3000:]
    assert "resumed from" in log and "train_epoch_2_step_1.pth (epoch 2, after step 1)" in log
    assert_same_weights(parameters(final_weights(model_dir, 3)), parameters(uninterrupted), atol=0)
