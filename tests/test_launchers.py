"""tool/train.sh and tool/test.sh: the semseg-style experiment folder, train then test, and the full
terminal output kept beside it with the real exit status (POSIX sh, no pipefail)."""
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import CPU_ONLY, REPO_ROOT


def tiny_overrides(toy: Path, result: Path) -> list[str]:
    """The shipped toy config, pointed at the tiny toy data and shrunk to seconds."""
    return ["DATA.data_root", str(toy), "DATA.train_list", str(toy / "train.txt"), "DATA.val_list",
            str(toy / "val.txt"), "TEST.test_list", str(toy / "val.txt"), "TRAIN.epochs", "1", "TRAIN.train_h", "33",
            "TRAIN.train_w", "33", "TRAIN.batch_size", "4", "TRAIN.workers", "0", "TEST.base_size", "64",
            "TEST.test_h", "33", "TEST.test_w", "33", "TEST.scales", "[1.0]", "TEST.save_folder", str(result),
            "TEST.names_path", str(toy / "toy_names.txt"), "TEST.colors_path", str(toy / "toy_colors.txt")]


def launch(script: str, exp_root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **CPU_ONLY, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "EXP_ROOT": str(exp_root)}
    return subprocess.run(["sh", f"tool/{script}", "toy", "pspnet18", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_train_sh_trains_then_tests_and_keeps_the_terminal_output(tiny_toy, tmp_path):
    result = tmp_path / "result"
    out = launch("train.sh", tmp_path / "exp", *tiny_overrides(tiny_toy, result))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    exp_dir = tmp_path / "exp" / "toy" / "pspnet18"
    assert {"train.sh", "train.py", "test.py", "toy_pspnet18.yaml"} <= {p.name for p in exp_dir.iterdir()}
    assert (exp_dir / "model" / "train_epoch_1.pth").is_file()
    train_out, = exp_dir.glob("train-*.out")
    test_out, = exp_dir.glob("test-*.out")
    assert "training done" in train_out.read_text()
    assert "mIoU" in test_out.read_text() and str(exp_dir / "model" / "train_epoch_1.pth") in test_out.read_text()
    assert json.loads((result / "metrics.json").read_text())["images"] == 8

    out = launch("test.sh", tmp_path / "exp", *tiny_overrides(tiny_toy, tmp_path / "again"),
                 "TEST.model_path", str(exp_dir / "model" / "train_epoch_1.pth"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert len(list(exp_dir.glob("test-*.out"))) == 2  # train.sh's and this one's
    assert json.loads((tmp_path / "again" / "metrics.json").read_text()) == \
        json.loads((result / "metrics.json").read_text())


def test_train_sh_fails_with_the_training_status_and_keeps_the_reason(tiny_toy, tmp_path):
    out = launch("train.sh", tmp_path / "exp", *tiny_overrides(tiny_toy, tmp_path / "result"), "TRAIN.base_lrr", "1")
    assert out.returncode != 0
    exp_dir = tmp_path / "exp" / "toy" / "pspnet18"
    train_out, = exp_dir.glob("train-*.out")
    assert "did you mean base_lr" in train_out.read_text()
    assert not list(exp_dir.glob("test-*.out"))  # stopped after the failed training
