"""Faults survived: killed runs resume to the same weights, a dead process ends a distributed job,
a full or unwritable disk and a diverging loss stop cleanly, and untrusted checkpoints stay inert.

Everything runs the real scripts on the tiny toy data (layers-18 PSPNet, 33 px crops) on the CPU.
"""
import builtins
import errno
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import util.checkpoint as checkpoint
from conftest import CPU_ONLY, REPO_ROOT, assert_one_line_error, run_tool, write_config
from model import build_model
from util.config import load_config
from util.errors import CheckpointError

TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
KILL_SEED = 2024
KILLS = 6  # runs to kill; half at a random moment, half while a checkpoint is being written
JOB_EXIT_BOUND_S = 60.0  # a distributed job must end this soon after one of its processes dies


def sub_list(source: Path, target: Path, lines: int) -> str:
    target.write_text("".join(source.read_text().splitlines(True)[:lines]))
    return str(target)


def kill_run_config(tiny_toy: Path, folder: Path) -> Path:
    """4 epochs of 2 steps, a checkpoint and an evaluation after every epoch (best.pth too)."""
    folder.mkdir(parents=True)
    data = {"train_list": sub_list(tiny_toy / "train.txt", folder / "train4.txt", 4),
            "val_list": sub_list(tiny_toy / "val.txt", folder / "val2.txt", 2)}
    train = {"batch_size": 2, "batch_size_val": 2, "epochs": 4, "evaluate": True, "dropout": 0.1,
             "save_freq": 1, "keep_checkpoints": 2}
    return write_config(folder / "cfg.yaml", tiny_toy, DATA=data, TRAIN=train)


def checkpoint_files(save_path: Path) -> list[Path]:
    return sorted(save_path.glob("train_epoch_*.pth")) + sorted(save_path.glob(checkpoint.BEST_FILE))


def temporaries(save_path: Path) -> list[Path]:
    return [p for p in save_path.iterdir() if checkpoint.TEMPORARY_FILE.match(p.name)] if save_path.is_dir() else []


def assert_every_checkpoint_loads(save_path: Path) -> None:
    """No file under a final checkpoint name is ever truncated."""
    for path in checkpoint_files(save_path):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if path.name != checkpoint.BEST_FILE:
            assert ckpt["epoch"] == int(re.findall(r"\d+", path.name)[0]), path


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-7, rtol=1e-6, msg=f"{key} differs")


def start_training(cfg: Path, folder: Path, *extra: str, launcher=None) -> tuple[subprocess.Popen, Path]:
    """tool/train.py in the background, its output going to a fresh log file in `folder`."""
    log_path = folder / f"run-{time.monotonic_ns()}.log"
    cmd = (launcher or [sys.executable]) + [str(REPO_ROOT / "tool" / "train.py"), f"--config={cfg}", *extra]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **CPU_ONLY})
    return proc, log_path


def kill_when(proc: subprocess.Popen, ready, delay: float) -> bool:
    """SIGKILL `delay` seconds after ready() first holds; False when the run ended before that."""
    while not ready():
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)  # a no-op if it has just exited
    proc.wait()
    return True


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_weights(tiny_toy, tmp_path):
    """Kills alternate between a random moment (after a random number of logged steps, plus a random
    delay) and a random moment while atomic_save writes a checkpoint; each run resumes with `auto`."""
    straight = kill_run_config(tiny_toy, tmp_path / "straight")
    out = run_tool("train.py", f"--config={straight}")
    assert out.returncode == 0, out.stderr[-3000:]
    expected = {name: torch.load(tmp_path / "straight" / "model" / name, map_location="cpu", weights_only=True)
                for name in ("train_epoch_4.pth", checkpoint.BEST_FILE)}

    cfg = kill_run_config(tiny_toy, tmp_path / "killed")
    save_path = tmp_path / "killed" / "model"
    rng = random.Random(KILL_SEED)
    kills, cut_short = 0, set()
    for attempt in range(KILLS):
        left_over = set(temporaries(save_path))  # from an earlier kill; this run deletes them first
        proc, log_path = start_training(cfg, tmp_path / "killed", "TRAIN.resume", "auto")
        if attempt % 2:
            killed = kill_when(proc, lambda: set(temporaries(save_path)) - left_over, rng.uniform(0.0, 0.05))
        else:
            steps = rng.randint(1, 3)
            killed = kill_when(proc, lambda: log_path.read_text().count("step [") >= steps, rng.uniform(0.0, 0.5))
        if not killed:
            assert proc.returncode == 0, log_path.read_text()[-3000:]
            break
        kills += 1
        cut_short |= {p.name for p in temporaries(save_path)}  # writes the kill interrupted (names hold the pid)
        assert_every_checkpoint_loads(save_path)
    out = run_tool("train.py", f"--config={cfg}", "TRAIN.resume", "auto")
    assert out.returncode == 0, out.stderr[-3000:]

    assert kills >= 2 and cut_short, (kills, cut_short)
    assert not temporaries(save_path), "unfinished checkpoints of killed runs were left behind"
    assert_every_checkpoint_loads(save_path)
    for name, reference in expected.items():
        got = torch.load(save_path / name, map_location="cpu", weights_only=True)
        assert got["epoch"] == reference["epoch"] and got["best_miou"] == reference["best_miou"], name
        assert_same_state(got["state_dict"], reference["state_dict"])


def child_pids(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def rank_of(pid: int) -> int | None:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    found = [int(v.split(b"=", 1)[1]) for v in env if v.startswith(b"RANK=")]
    return found[0] if found else None


def wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert proc.poll() is None, path.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} after {timeout} s"
        time.sleep(0.1)


@pytest.mark.slow
def test_killing_one_of_two_processes_ends_the_job_naming_the_rank(tiny_toy, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_toy, TRAIN={"epochs": 100})
    proc, log_path = start_training(cfg, tmp_path, launcher=TORCHRUN_2)
    try:
        wait_for_text(log_path, "step [", proc, timeout=240)
        workers = {rank_of(pid): pid for pid in child_pids(proc.pid)}
        assert set(workers) == {0, 1}, workers
        os.kill(workers[1], signal.SIGKILL)
        killed_at = time.monotonic()
        returncode = proc.wait(timeout=JOB_EXIT_BOUND_S + 30)
        took = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log_path.read_text()
    assert returncode != 0
    assert took < JOB_EXIT_BOUND_S, f"the job took {took:.1f} s to end"
    root_cause = output.split("Root Cause")[-1]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*exitcode\s*:\s*-9", root_cause), output[-3000:]
    with pytest.raises(ProcessLookupError):  # the surviving rank was stopped too, not left running
        os.kill(workers[0], 0)


def test_unwritable_save_path_and_save_folder_fail_before_any_work(tiny_toy, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = write_config(tmp_path / "cfg.yaml", tiny_toy, TRAIN={"save_path": str(blocker / "model")},
                       TEST={"save_folder": str(blocker / "result"), "model_path": str(tmp_path / "none.pth")})
    out = run_tool("train.py", f"--config={cfg}")
    assert_one_line_error(out, "TRAIN.save_path", str(blocker / "model"), "not writable")
    out = run_tool("test.py", f"--config={cfg}")
    assert_one_line_error(out, "TEST.save_folder", str(blocker / "result"), "not writable")


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs (needs root or CAP_SYS_ADMIN, else the test is skipped)."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)],
                             capture_output=True) if shutil.which("mount") else None
    if mounted is None or mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_disk_too_small_for_checkpoints_is_refused_before_training(tiny_toy, tmp_path, small_disk):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_toy, TRAIN={"save_path": str(small_disk / "model")})
    out = run_tool("train.py", f"--config={cfg}")
    line = assert_one_line_error(out, "TRAIN.save_path", str(small_disk / "model"), "MiB free on its disk")
    free, needed = map(int, re.search(r"only (\d+) MiB free .* about (\d+) MiB needed", line).groups())
    assert free <= 64 < needed
    assert "step [" not in out.stdout and not list(small_disk.rglob("*.pth"))


class FillsUp:
    """A file whose disk is full after `budget` bytes, as write(2) reports it."""

    def __init__(self, file, budget: int):
        self.file, self.budget = file, budget

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self.budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= size
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    good = {"epoch": 1, "state_dict": {"w": torch.arange(10000.0)}}
    target = tmp_path / "train_epoch_1.pth"
    checkpoint.atomic_save(good, target)
    before = target.read_bytes()

    def full_disk_open(file, mode="r", *args, **kwargs):
        opened = builtins.open(file, mode, *args, **kwargs)
        return FillsUp(opened, 1000) if "w" in mode else opened

    monkeypatch.setattr(checkpoint, "open", full_disk_open, raising=False)
    for name in ("train_epoch_1.pth", "train_epoch_2.pth"):  # replacing a file, and a new one
        with pytest.raises(CheckpointError, match=f"could not write checkpoint .*{name}.*earlier checkpoints"):
            checkpoint.atomic_save({"epoch": 2, "state_dict": {"w": torch.zeros(10000)}}, tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_epoch_1.pth"]  # no half-written file left
    assert target.read_bytes() == before
    (tmp_path / ".train_epoch_9.pth.tmp4242").write_bytes(before[:100])  # a writer killed mid-write
    assert checkpoint.resolve_resume("auto", tmp_path) == target
    assert [p.name for p in checkpoint.remove_stale_temporaries(tmp_path)] == [".train_epoch_9.pth.tmp4242"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_epoch_1.pth"]


def test_an_error_that_is_not_the_write_is_not_reported_as_a_full_disk(tmp_path, monkeypatch):
    """A data worker's death, reported by PyTorch while the process saves, is not a disk problem."""
    def worker_died(*args, **kwargs):
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Terminated.")

    monkeypatch.setattr(checkpoint.torch, "save", worker_died)
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        checkpoint.atomic_save({"epoch": 1}, tmp_path / "train_epoch_1.pth")
    assert not list(tmp_path.iterdir())


def test_an_explicit_resume_from_an_earlier_point_moves_the_later_checkpoints_aside(tmp_path):
    """Else pruning (the highest epochs kept) deletes the resumed run's new files, and a restart's
    `resume auto` goes back to the abandoned branch."""
    names = ["best.pth", "train_epoch_4.pth", "train_epoch_5.pth", "train_epoch_6_step_3.pth", "train_epoch_9.pth"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    archive = checkpoint.archive_checkpoints_after(tmp_path, (5, 0))
    assert archive.parent == tmp_path and archive.name.startswith("previous-")
    assert sorted(p.name for p in archive.iterdir()) == ["train_epoch_6_step_3.pth", "train_epoch_9.pth"]
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == names[:3]
    assert checkpoint.archive_checkpoints_after(tmp_path, (5, 0)) is None


def test_space_check_counts_only_the_checkpoints_still_to_come(tmp_path):
    assert checkpoint.checkpoints_to_come(tmp_path, keep=2) == 5  # 2 kept, the new one, best.pth, its successor
    for epoch in (1, 2, 3):
        (tmp_path / f"train_epoch_{epoch}.pth").write_bytes(b"x")
    assert checkpoint.checkpoints_to_come(tmp_path, keep=2) == 3
    (tmp_path / checkpoint.BEST_FILE).write_bytes(b"x")
    assert checkpoint.checkpoints_to_come(tmp_path, keep=2) == 2


@pytest.mark.slow
def test_disk_filling_up_mid_run_stops_cleanly_and_resume_finishes(tiny_toy, tmp_path):
    """A real full disk (tmpfs) after epoch 1: one-line error, epoch 1 intact, resume completes."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    cfg = write_config(tmp_path / "cfg.yaml", tiny_toy, TRAIN={"save_path": str(mount_point / "model"),
                                                               "keep_checkpoints": 1, "print_freq": 4,
                                                               "checkpoint_minutes": 0})  # epoch files only
    probe = load_config(cfg)
    with torch.device("meta"):
        checkpoint_bytes = 2 * sum(p.numel() * 4 for p in build_model(probe).parameters())
    size = 4 * checkpoint_bytes + 2**22  # exactly what the start-up check asks for, and some room for logs
    if not shutil.which("mount") or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        proc, log_path = start_training(cfg, tmp_path)
        wait_for_text(log_path, "INFO] saved ", proc, timeout=240)
        filler = mount_point / "filler"
        with open(filler, "wb") as f:  # someone else fills the disk
            try:
                while True:
                    f.write(b"\0" * 2**20)
            except OSError as e:
                assert e.errno == errno.ENOSPC
        assert proc.wait(timeout=240) == 2
        output = log_path.read_text()
        message = [line for line in output.splitlines() if line.startswith("error: ")]
        assert len(message) == 1 and "could not write checkpoint" in message[0], output[-3000:]
        assert "Traceback" not in output, output[-3000:]  # TensorBoard's failed flush at exit: one warning line
        assert re.search(r"train_epoch_2\.pth \(.+\); \d+ MiB free on its disk; earlier checkpoints", message[0])
        assert sorted(p.name for p in (mount_point / "model").glob("*.pth")) == ["train_epoch_1.pth"]
        assert not temporaries(mount_point / "model")
        assert_every_checkpoint_loads(mount_point / "model")
        filler.unlink()
        out = run_tool("train.py", f"--config={cfg}", "TRAIN.resume", "auto")
        assert out.returncode == 0, out.stderr[-3000:]
        assert "train_epoch_1.pth (epoch 1 done)" in out.stdout
        assert sorted(p.name for p in (mount_point / "model").glob("*.pth")) == ["train_epoch_2.pth"]
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_diverging_loss_stops_at_its_iteration_and_keeps_the_last_checkpoint(tiny_toy, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_toy, TRAIN={"epochs": 2, "print_freq": 4})
    save_path = tmp_path / "model"
    out = run_tool("train.py", f"--config={cfg}", "TRAIN.epochs", "1")  # epoch 1 at a sane learning rate
    assert out.returncode == 0, out.stderr[-3000:]
    good = file_digest(save_path / "train_epoch_1.pth")

    out = run_tool("train.py", f"--config={cfg}", "TRAIN.resume", "auto", "TRAIN.base_lr", "1e30")
    line = assert_one_line_error(out, "NaN/inf", "TRAIN.base_lr", "train_epoch_1.pth is intact")
    iteration, epoch, step = map(int, re.search(r"iteration (\d+) \(epoch (\d+), step (\d+)\)", line).groups())
    assert epoch == 2 and iteration == 4 + step  # 4 steps per epoch; epoch 1 came from the checkpoint
    assert sorted(p.name for p in save_path.glob("*.pth")) == ["train_epoch_1.pth"]
    assert file_digest(save_path / "train_epoch_1.pth") == good
    hint = (f"the run stopped; {save_path / 'train_epoch_1.pth'} holds epoch 1 of 2; to continue from it, run: "
            f"python {REPO_ROOT / 'tool' / 'train.py'} --config={cfg} TRAIN.base_lr 1e30 TRAIN.resume auto")
    assert hint in out.stdout  # a crash after a checkpoint says how to go on (here after lowering base_lr)

    fresh = write_config(tmp_path / "fresh" / "cfg.yaml", tiny_toy, TRAIN={"base_lr": 1e30})
    out = run_tool("train.py", f"--config={fresh}")
    assert_one_line_error(out, "NaN/inf at iteration", "no checkpoint had been saved")
    assert "to continue from it" not in out.stdout
    assert not list((tmp_path / "fresh" / "model").glob("*.pth"))


class RunsCode:
    """Unpickling this writes a marker file: what a malicious checkpoint could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.fixture
def booby_trapped(tiny_toy, tmp_path) -> tuple[Path, Path]:
    """A complete, loadable-looking training checkpoint that also carries code."""
    marker = tmp_path / "code_ran"
    model = build_model(load_config(write_config(tmp_path / "probe.yaml", tiny_toy)))
    path = tmp_path / "trapped.pth"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "optimizer": RunsCode(marker)}, path)
    return path, marker


def test_planted_code_in_a_checkpoint_never_runs(tiny_toy, tmp_path, booby_trapped):
    path, marker = booby_trapped
    cfg = write_config(tmp_path / "cfg.yaml", tiny_toy, TEST={"model_path": str(path)})
    for tool, key in (("train.py", "TRAIN.resume"), ("train.py", "TRAIN.weight"), ("test.py", "TEST.model_path")):
        out = run_tool(tool, f"--config={cfg}", key, str(path))
        assert_one_line_error(out, key, str(path), "arbitrary Python objects", "exec",
                              "TRAIN.trust_pickle True")
        assert not marker.exists(), f"{tool} {key} ran the planted code"
    torch.load(path, weights_only=False)  # the trap is real: an unguarded load does run it
    assert marker.read_text() == "pwned"


class _SelfKillingSamples(torch.utils.data.Dataset):
    """A data-loader worker that dies as one killed by the out-of-memory killer does."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        os.kill(os.getpid(), signal.SIGKILL)


class _ExitTimeFlush:
    """Stands in for tensorboardX's event file, flushed when it is collected on a full disk."""

    def __del__(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def script_hooks(monkeypatch):
    """run_main installs process-wide hooks; put the test process's back afterwards."""
    monkeypatch.delenv("SEMSEG_DEBUG", raising=False)
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    monkeypatch.setattr("threading.excepthook", __import__("threading").excepthook)


def test_a_killed_data_worker_is_one_line_with_the_likely_cause(script_hooks, capsys):
    from util.cli import run_main

    def main():
        for _ in torch.utils.data.DataLoader(_SelfKillingSamples(), num_workers=1):
            pass

    with pytest.raises(SystemExit) as exit_info:
        run_main(main)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: DataLoader worker (pid"), err
    assert "out-of-memory" in lines[0] and "TRAIN.resume auto" in lines[0]


def test_oserrors_in_exit_time_cleanup_are_one_warning_line(script_hooks, capsys):
    import threading

    from util.cli import run_main

    def main():
        flush = _ExitTimeFlush()
        del flush  # the finaliser's OSError goes to sys.unraisablehook
        thread = threading.Thread(target=lambda: (_ for _ in ()).throw(OSError("handle is closed")))
        thread.start()
        thread.join()

    with pytest.raises(SystemExit) as exit_info:
        run_main(main)
    err = capsys.readouterr().err
    assert exit_info.value.code == 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    assert "_ExitTimeFlush.__del__ failed while exiting: [Errno 28] No space left on device" in lines[0]
    assert lines[1] == "warning: background thread threading.Thread stopped: handle is closed"


def test_cuda_out_of_memory_is_one_line_with_what_to_lower(script_hooks, capsys):
    from util.cli import run_main

    def main():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                     "of 79.19 GiB of which 1.06 GiB is free. Of the allocated memory ...")

    with pytest.raises(SystemExit) as exit_info:
        run_main(main)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(lines) == 1
    assert lines[0].startswith("error: CUDA out of memory. Tried to allocate 2.00 GiB: the GPU ran out of memory")
    assert "TRAIN.batch_size" in lines[0] and "TEST.test_batch_size" in lines[0]
