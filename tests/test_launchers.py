"""tool/train.sh and tool/test.sh: the semseg-style experiment folder holding everything of one
experiment (checkpoints, scores, terminal output), train then test, the real exit status (POSIX sh,
no pipefail), and Ctrl-C: the message reaches terminal and log, and the same command resumes."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import CPU_ONLY, REPO_ROOT
from util.config import load_config
from util.experiment import RESUME_COMMAND_VARIABLE, evaluation_paths, result_folder, rerun_command, resume_command
from util.preemption import PAUSE_VARIABLE


def tiny_overrides(toy: Path) -> list[str]:
    """The shipped toy config, pointed at the tiny toy data and shrunk to seconds."""
    return ["DATA.data_root", str(toy), "DATA.train_list", str(toy / "train.txt"), "DATA.val_list",
            str(toy / "val.txt"), "TEST.test_list", str(toy / "val.txt"), "TRAIN.epochs", "1", "TRAIN.train_h", "33",
            "TRAIN.train_w", "33", "TRAIN.batch_size", "4", "TRAIN.workers", "0", "TEST.base_size", "64",
            "TEST.test_h", "33", "TEST.test_w", "33", "TEST.scales", "[1.0]",
            "TEST.names_path", str(toy / "toy_names.txt"), "TEST.colors_path", str(toy / "toy_colors.txt")]


def launcher_env(exp_root: Path, **extra: str) -> dict:
    return {**os.environ, **CPU_ONLY, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "EXP_ROOT": str(exp_root),
            **extra}


def launch(script: str, exp_root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", f"tool/{script}", "toy", "pspnet18", *args], cwd=REPO_ROOT, env=launcher_env(exp_root),
                          capture_output=True, text=True, timeout=300)


def scores_written_since(folder: Path, start: float) -> list[Path]:
    return sorted(p for p in folder.rglob("metrics.json") if p.stat().st_mtime >= start)


def test_train_sh_keeps_scores_and_terminal_output_in_the_experiment_folder(tiny_toy, tmp_path):
    start = time.time() - 1
    out = launch("train.sh", tmp_path / "exp", *tiny_overrides(tiny_toy))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    exp_dir = tmp_path / "exp" / "toy" / "pspnet18"
    assert {"train.sh", "train.py", "test.py", "toy_pspnet18.yaml"} <= {p.name for p in exp_dir.iterdir()}
    checkpoint = exp_dir / "model" / "train_epoch_1.pth"
    assert checkpoint.is_file()
    train_out, = exp_dir.glob("train-*.out")
    test_out, = exp_dir.glob("test-*.out")
    assert "training done" in train_out.read_text()
    assert "mIoU" in test_out.read_text() and str(checkpoint) in test_out.read_text()
    # the checkpoint of epoch 1, one scale on val: inside the experiment, and nowhere else
    scores = exp_dir / "result" / "epoch_1" / "val" / "ss" / "metrics.json"
    assert scores_written_since(tmp_path, start) == [scores]
    assert json.loads(scores.read_text())["images"] == 8
    fixed = REPO_ROOT / load_config(REPO_ROOT / "config/toy/toy_pspnet18.yaml").save_folder  # the config's own
    assert not (fixed.is_dir() and scores_written_since(fixed, start))

    out = launch("test.sh", tmp_path / "exp", *tiny_overrides(tiny_toy), "TEST.scales", "[1.0, 1.25]")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert len(list(exp_dir.glob("test-*.out"))) == 2  # train.sh's and this one's
    multi_scale = exp_dir / "result" / "epoch_1" / "val" / "ms" / "metrics.json"
    assert scores_written_since(tmp_path, start) == [multi_scale, scores]
    assert json.loads(multi_scale.read_text())["scales"] == [1.0, 1.25]


def test_logged_returns_the_status_of_its_command_and_keeps_its_output(tmp_path):
    script = '. tool/logged.sh; logged "$1" sh -c "echo said; exit 7" && echo "status 0" || echo "status $?"'
    out = subprocess.run(["sh", "-c", script, "sh", str(tmp_path / "out")], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.splitlines() == ["+ sh -c echo said; exit 7", "said", "status 7"], out.stdout + out.stderr
    assert (tmp_path / "out").read_text().splitlines() == out.stdout.splitlines()[:2]


def test_train_sh_fails_with_the_training_status_and_keeps_the_reason(tiny_toy, tmp_path):
    """A failure only training meets (its list is missing; evaluating would need the checkpoint it never
    wrote): train.sh must stop with train.py's status 2 before evaluating, which it does only if
    logged.sh passes that status on."""
    missing = tmp_path / "no_train.txt"
    out = launch("train.sh", tmp_path / "exp", *tiny_overrides(tiny_toy), "DATA.train_list", str(missing))
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    exp_dir = tmp_path / "exp" / "toy" / "pspnet18"
    train_out, = exp_dir.glob("train-*.out")
    assert f"list file {missing}: not found (DATA.train_list)" in train_out.read_text()
    assert not list(exp_dir.glob("test-*.out"))  # stopped after the failed training


def test_ctrl_c_under_train_sh_says_how_to_continue_and_the_same_command_resumes(tiny_toy, tmp_path):
    """SIGINT to the whole foreground process group, as a terminal's Ctrl-C sends it, while training
    waits after the first step of epoch 2 until it sees the signal (the test hook of
    util/preemption.py: no race with a one-second epoch): that step is saved, `interrupted` and the command to continue reach the terminal
    and train-<time>.out, no temporary file is left, and that command finishes the run and evaluates it."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    exp_dir = tmp_path / "exp" / "toy" / "pspnet18"
    args = [*tiny_overrides(tiny_toy), "TRAIN.epochs", "2"]
    pause = tmp_path / "pause"
    pause.mkdir()
    run = subprocess.Popen(["sh", "tool/train.sh", "toy", "pspnet18", *args], cwd=REPO_ROOT, text=True,
                           env=launcher_env(tmp_path / "exp", TMPDIR=str(scratch), **{PAUSE_VARIABLE: f"5:{pause}"}),
                           start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (pause / "paused-rank0").is_file() or not (pause / "paused-rank0").read_text():
        assert run.poll() is None and time.monotonic() < deadline, "training did not reach epoch 2"
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGINT)  # the paused run goes on once its handler has seen it
    terminal, errors = run.communicate(timeout=120)
    assert run.returncode == 130, terminal[-2000:] + errors[-2000:]
    train_out, = exp_dir.glob("train-*.out")
    last = terminal.strip().splitlines()[-1]
    assert last == train_out.read_text().strip().splitlines()[-1]
    assert last.startswith(f"interrupted; {exp_dir / 'model' / 'train_epoch_2_step_1.pth'} holds epoch 1 of 2 and "
                           f"step 1 of epoch 2; to continue from it, run: "), last
    assert not list(scratch.glob("tmp.*"))  # no mktemp file left behind (torch keeps its own caches there)
    assert not list(exp_dir.glob("test-*.out"))

    command = last.split("to continue from it, run: ", 1)[1]
    assert shlex.split(command)[:5] == [f"EXP_ROOT={tmp_path / 'exp'}", f"PYTHON={sys.executable}", "sh",
                                        "tool/train.sh", "toy"]
    resumed = subprocess.run(["sh", "-c", command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                             env={**os.environ, **CPU_ONLY, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "(epoch 2, after step 1)" in resumed.stdout
    assert "previous-" not in resumed.stdout
    assert json.loads((exp_dir / "result" / "epoch_2" / "val" / "ss" / "metrics.json").read_text())["images"] == 8


def test_result_folders_are_named_after_the_checkpoint_split_and_scales():
    assert result_folder("exp/a/b", "exp/a/b/model/train_epoch_12.pth", "val", [1.0]) == \
        Path("exp/a/b/result/epoch_12/val/ss")
    assert result_folder("x", "/elsewhere/best.pth", "test", [0.5, 1.0]) == Path("x/result/best/test/ms")
    assert result_folder("x", "exp/m.onnx", "val", [1.0]) == Path("x/result/m.onnx/val/ss")  # not the checkpoint's


def test_the_experiment_evaluates_what_it_trained_or_the_export_given():
    config = str(REPO_ROOT / "config/toy/toy_pspnet18.yaml")
    assert evaluation_paths(config, "x", []) == ("x/model/train_epoch_12.pth", Path("x/result/epoch_12/val/ms"))
    assert evaluation_paths(config, "x", ["TRAIN.save_path", "/y", "TRAIN.epochs", "2"]) == \
        ("/y/train_epoch_2.pth", Path("x/result/epoch_2/val/ms"))
    assert evaluation_paths(config, "x", ["TEST.onnx_path", "m.onnx"])[1] == Path("x/result/m.onnx/val/ms")


def test_the_continue_command_replaces_any_other_resume_setting(monkeypatch):
    argv = ["tool/train.py", "--config=c.yaml", "TRAIN.resume", "''", "TRAIN.epochs=3", "resume", "old.pth"]
    assert resume_command(argv, {}, "single") == "python tool/train.py --config=c.yaml TRAIN.epochs 3 TRAIN.resume auto"
    assert resume_command(argv, {"LOCAL_WORLD_SIZE": "4"}, "torchrun").startswith(
        "torchrun --nproc_per_node=4 tool/train.py --config=c.yaml")
    assert resume_command(argv, {RESUME_COMMAND_VARIABLE: "sh tool/train.sh a b"}, "single") == "sh tool/train.sh a b"
    monkeypatch.setenv("EXP_ROOT", "/x y")
    monkeypatch.delenv("NPROC", raising=False)
    monkeypatch.delenv("PYTHON", raising=False)
    assert rerun_command("tool/train.sh", "toy", "pspnet18", ["TRAIN.resume", "''", "TEST.scales", "[1.0, 2.0]"]) == \
        "'EXP_ROOT=/x y' sh tool/train.sh toy pspnet18 TEST.scales '[1.0, 2.0]'"
    assert rerun_command(str(REPO_ROOT / "tool/slurm_train.sh"), "ade20k", "pspnet50", []).startswith(
        f"'EXP_ROOT=/x y' sbatch {REPO_ROOT / 'tool/slurm_train.sh'} ade20k pspnet50")  # resubmitted
