"""Preemption and restarts: a signal to torchrun or to one rank stops every process after the same
iteration with a mid-epoch checkpoint of that exact point, and resuming (also in another number of
processes, also by torchrun's --max-restarts after a SIGKILL) ends with an uninterrupted run's
weights. Runs pause at an iteration through the test hook of util/preemption.py and go on only once signalled
(or released), so the signal lands at a point the test chooses, never in a race with training.

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
from util.preemption import PAUSE_VARIABLE, RELEASED, STOP_SIGNALS, STOPPED_STATUS

TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
TRAIN = {"epochs": 3, "print_freq": 2, "sync_bn": False, "checkpoint_minutes": 0}
ITERATIONS_PER_EPOCH = 2


def config(root: Path, toy: Path) -> Path:
    (root / "train8.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "train8.txt").write_text("".join((toy / "train.txt").read_text().splitlines(True)[:8]))
    return write_config(root / "cfg.yaml", toy, DATA={"train_list": str(root / "train8.txt")}, TRAIN=TRAIN)


def start(cfg: Path, *args: str, launcher=TORCHRUN_2, pause: tuple[int, Path] | None = None,
          log: Path | None = None, own_group: bool = False) -> subprocess.Popen:
    """tool/train.py on the CPU, its output into `log`; with pause=(k, folder) every rank waits after
    iteration k until released (see util.preemption.pause_for_test); with own_group, in a process
    group of its own, as a job that a scheduler signals as a whole."""
    env = {**os.environ, **CPU_ONLY, "OMP_NUM_THREADS": "1"}
    if pause is not None:
        pause[1].mkdir(parents=True, exist_ok=True)
        env[PAUSE_VARIABLE] = f"{pause[0]}:{pause[1]}"
    out = open(log or cfg.parent / "run.log", "w")
    return subprocess.Popen([*launcher, str(REPO_ROOT / "tool" / "train.py"), f"--config={cfg}", *args],
                            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                            start_new_session=own_group)


def paused_ranks(folder: Path, ranks: int, run: subprocess.Popen) -> dict[int, int]:
    """Wait until every rank has paused; rank -> process id."""
    deadline = time.monotonic() + 240
    markers = [folder / f"paused-rank{rank}" for rank in range(ranks)]
    while not all(m.is_file() and m.read_text() for m in markers):
        assert run.poll() is None, f"the run ended before pausing: {run.returncode}"
        assert time.monotonic() < deadline, "the run did not pause"
        time.sleep(0.05)
    return {rank: int(m.read_text()) for rank, m in enumerate(markers)}


def release(folder: Path, *ranks: int) -> None:
    """Let these paused ranks go on; a signalled rank goes on by itself (and only with its flag set)."""
    for rank in ranks:
        (folder / f"paused-rank{rank}").write_text(RELEASED)


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


def stopped_lines(log: str) -> list[str]:
    """The last line of each process that stopped on request (util.cli.run_main prints it, then exits 75)."""
    return [line for line in log.splitlines() if line.startswith("stopped; ")]


@pytest.mark.slow
def test_sigterm_to_torchrun_then_sigusr1_to_one_rank_then_one_process_end_as_if_never_stopped(
        tiny_toy, tmp_path, uninterrupted):
    """Three legs, each resuming the last: SIGTERM to torchrun in epoch 2, SIGUSR1 to rank 1 alone in
    epoch 3, then one process (two accumulation steps, the same global batches) finishes."""
    cfg = config(tmp_path, tiny_toy)
    model_dir = tmp_path / "model"
    run = start(cfg, pause=(ITERATIONS_PER_EPOCH + 1, tmp_path / "pause1"))  # epoch 2, step 1
    paused_ranks(tmp_path / "pause1", 2, run)
    run.send_signal(signal.SIGTERM)  # as SLURM or a user ends torchrun; it passes SIGTERM on
    status, log = finish(run, cfg)
    assert status == 1, log[-3000:]  # torchrun's own status after a SIGTERM; its workers exit 75 (below)
    where = "on SIGTERM in epoch 2/3 after step 1/2 (iteration 3)"
    assert len(stopped_lines(log)) == 2 and all(where in line for line in stopped_lines(log)), log[-3000:]
    assert f"{model_dir / 'train_epoch_2_step_1.pth'} holds epoch 1 of 3 and step 1 of epoch 2; to continue from " \
           f"it, run: torchrun --nproc_per_node=2 " in log
    assert mid_epoch_files(model_dir) == ["train_epoch_2_step_1.pth"]
    assert not (model_dir / "train_epoch_2.pth").exists()

    run = start(cfg, "TRAIN.resume", "auto", pause=(2 * ITERATIONS_PER_EPOCH + 1, tmp_path / "pause2"))
    pids = paused_ranks(tmp_path / "pause2", 2, run)
    os.kill(pids[1], signal.SIGUSR1)  # one rank only: SLURM's --signal reaches the tasks one by one
    release(tmp_path / "pause2", 0)  # rank 0 never got it
    status, log = finish(run, cfg)
    assert status == 1 and f"exitcode  : {STOPPED_STATUS}" in log, log[-3000:]  # torchrun's failure report
    assert "resumed from" in log and "train_epoch_2_step_1.pth (epoch 2, after step 1)" in log
    assert len(stopped_lines(log)) == 2
    assert all("on SIGUSR1 in epoch 3/3 after step 1/2 (iteration 5)" in line for line in stopped_lines(log))
    assert mid_epoch_files(model_dir) == ["train_epoch_3_step_1.pth"]  # only the newest is kept

    run = start(cfg, "TRAIN.resume", "auto", "TRAIN.accum_steps", "2", launcher=[sys.executable])
    status, log = finish(run, cfg)
    assert status == 0, log[-3000:]
    assert "train_epoch_3_step_1.pth (epoch 3, after step 1)" in log
    assert_same_weights(parameters(final_weights(model_dir, 3)), parameters(uninterrupted), atol=0)


@pytest.mark.slow
def test_max_restarts_resumes_by_itself_after_a_sigkill(tiny_toy, tmp_path, uninterrupted):
    """One worker killed at the end of epoch 2 (after the mid-epoch checkpoint of its step 1, before
    the epoch's own): torchrun restarts the group, which continues from that checkpoint, not from
    scratch, and ends with the uninterrupted weights (BatchNorm statistics included)."""
    cfg = config(tmp_path, tiny_toy)
    restarts = [*TORCHRUN_2, "--max-restarts=1"]
    run = start(cfg, "TRAIN.checkpoint_minutes", "1e-9", launcher=restarts, pause=(4, tmp_path / "pause"))
    pids = paused_ranks(tmp_path / "pause", 2, run)
    assert mid_epoch_files(tmp_path / "model") == ["train_epoch_2_step_1.pth"]
    os.kill(pids[1], signal.SIGKILL)
    release(tmp_path / "pause", 0)
    status, log = finish(run, cfg)
    assert status == 0, log[-3000:]
    assert "resumed from" in log and "train_epoch_2_step_1.pth (epoch 2, after step 1)" in log, log[-3000:]
    assert "moved them" not in log  # the restarted group did not start over
    assert_same_weights(final_weights(tmp_path / "model", 3), uninterrupted, atol=0)


ONE_PROCESS = [sys.executable]


def test_sigterm_to_the_whole_job_with_workers_and_no_seed_resumes_as_never_stopped(tiny_toy, tmp_path):
    """scancel, SLURM preemption and docker stop signal every process of the job, data workers included.
    The run sets no TRAIN.manual_seed: the seed it drew comes back with the checkpoint. The stop comes
    after the last step of epoch 1, so the resumed run starts at that epoch's validation."""
    def run_config(name: str, seed: int | None) -> Path:
        root = tmp_path / name
        (root / "train8.txt").parent.mkdir(parents=True)
        (root / "train8.txt").write_text("".join((tiny_toy / "train.txt").read_text().splitlines(True)[:8]))
        return write_config(root / "cfg.yaml", tiny_toy, DATA={"train_list": str(root / "train8.txt")},
                            TRAIN={**TRAIN, "workers": 2, "manual_seed": seed})

    cfg = run_config("stopped", None)
    run = start(cfg, launcher=ONE_PROCESS, pause=(ITERATIONS_PER_EPOCH, tmp_path / "pause"), own_group=True)
    paused_ranks(tmp_path / "pause", 1, run)
    os.killpg(run.pid, signal.SIGTERM)
    status, log = finish(run, cfg)
    assert status == STOPPED_STATUS, log[-3000:]
    assert mid_epoch_files(cfg.parent / "model") == [f"train_epoch_1_step_{ITERATIONS_PER_EPOCH}.pth"]
    seed = int(re.search(r"TRAIN.manual_seed not set; using (\d+)", log).group(1))

    changed = subprocess.run([*ONE_PROCESS, str(REPO_ROOT / "tool" / "train.py"), f"--config={cfg}", "TRAIN.resume",
                              "auto", "TRAIN.batch_size", "2"], cwd=REPO_ROOT, env={**os.environ, **CPU_ONLY},
                             capture_output=True, text=True)
    assert changed.returncode == 2 and "of an epoch of 2 steps, but this run has 4 steps" in changed.stderr, (
        changed.stderr[-2000:])

    status, log = finish(start(cfg, "TRAIN.resume", "auto", launcher=ONE_PROCESS), cfg)
    assert status == 0, log[-3000:]
    assert f"the data order goes on with the run's seed {seed}" in log and "nan" not in log.lower()
    reference = run_config("reference", seed)
    status, reference_log = finish(start(reference, launcher=ONE_PROCESS), reference)
    assert status == 0, reference_log[-3000:]
    assert_same_weights(final_weights(reference.parent / "model", 3), final_weights(cfg.parent / "model", 3), atol=0)


def test_a_mid_epoch_checkpoint_is_saved_every_n_minutes_and_only_the_newest_kept(tiny_toy, tmp_path, monkeypatch):
    """A clock the test sets: 4 minutes pass per step (4 steps an epoch), a checkpoint is due 7 minutes
    after the last one; an epoch's own checkpoint counts as one. Runs in this process."""
    from tool import train
    from util.config import load_config
    cfg = load_config(write_config(tmp_path / "cfg.yaml", tiny_toy, TRAIN={"checkpoint_minutes": 7, "print_freq": 4}))
    now = [0.0]
    seen = []  # the mid-epoch files after each step, before that step's own save

    def four_minutes_per_step(iteration: int, rank: int, signalled) -> None:  # train.py calls it after every step
        now[0] += 4 * 60
        seen.append(mid_epoch_files(tmp_path / "model"))

    monkeypatch.setattr(train, "pause_for_test", four_minutes_per_step)
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        train.train_worker(cfg, None, clock=lambda: now[0])
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        torch.set_num_threads(2)
    first, second = ["train_epoch_1_step_2.pth"], ["train_epoch_2_step_2.pth"]
    assert seen == [[], [], first, first, first, first, second, second]  # saved at minutes 8 and 24
    assert mid_epoch_files(tmp_path / "model") == second
    assert (tmp_path / "model" / "train_epoch_2.pth").is_file()
