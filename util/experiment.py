"""Where a semseg-style experiment keeps its outputs, and the command that continues it.

An experiment folder (exp/<dataset>/<exp_name>, or under EXP_ROOT) holds everything of one
experiment: model/ with checkpoints, logs and TensorBoard events, and one result folder per
evaluation, result/epoch_<n>/<split>/<ss|ms>, named after the checkpoint evaluated (train_epoch_<n>.pth,
or the file's name for others such as best.pth -> result/best/...), the split, and one scale (ss)
or several (ms). The launchers pass these paths to train.py and test.py ahead of the user's
overrides, so the config's fixed TEST.save_folder never mixes two experiments, while an explicit
TEST.model_path or TEST.save_folder on the command line still wins (tool/train.sh, tool/test.sh,
tool/slurm_train.sh).

After Ctrl-C or a crash, train.py names the command that continues the run (resume_command):
tool/train.sh's own when it launched the run, since it resumes by default, else train.py's with
TRAIN.resume auto.

  python -m util.experiment paths <config> <exp_dir> [SECTION.key value ...]
prints the checkpoint to evaluate (the final epoch's, unless TEST.model_path is overridden) and the
result folder, one a line;
  python -m util.experiment rerun <launcher script> <dataset> <exp_name> [SECTION.key value ...]
prints the shell command that runs the launcher again (sbatch for a SLURM batch script), with its
environment settings and the overrides less TRAIN.resume (the launchers resume by default): what
an interrupted run suggests.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Mapping

from util.cli import run_main
from util.config import add_config_arguments, load_config, parse_config_args, split_overrides

LAUNCHER_SETTINGS = ("EXP_ROOT", "NPROC", "PYTHON")  # environment the launchers read
RESUME_COMMAND_VARIABLE = "SEMSEG_RESUME_COMMAND"  # tool/train.sh's own command, for train.py's hint


def result_folder(exp_dir: str | Path, network: str | Path, split: str, scales: list[float]) -> Path:
    """<exp_dir>/result/<name>/<split>/<ss|ms> for the evaluated file: epoch_<n> for train_epoch_<n>.pth,
    the stem of another checkpoint (best.pth -> best), the whole name of an ONNX export
    (model.onnx), so that evaluating an export never overwrites its checkpoint's results."""
    from util.checkpoint import EPOCH_FILE  # imports torch: not at the top, so that `rerun` answers at once
    network = Path(network)
    found = EPOCH_FILE.match(network.name)
    name = f"epoch_{found.group(1)}" if found else network.name if network.suffix == ".onnx" else network.stem
    return Path(exp_dir) / "result" / name / split / ("ss" if len(scales) == 1 else "ms")


def evaluation_paths(config: str | Path, exp_dir: str | Path, overrides: list[str]) -> tuple[str, Path]:
    """(TEST.model_path, TEST.save_folder) of the experiment's evaluation with these overrides: the
    final checkpoint in TRAIN.save_path (the experiment's model/ unless overridden), or the
    TEST.model_path / TEST.onnx_path of the overrides."""
    cfg = load_config(config, ["TRAIN.save_path", f"{exp_dir}/model"] + overrides)
    given = cfg.source("model_path") == "override"  # the config file's own model_path names another experiment
    model_path = cfg.model_path if given else f"{cfg.save_path}/train_epoch_{cfg.epochs}.pth"
    return model_path, result_folder(exp_dir, cfg.onnx_path or model_path, cfg.split, cfg.scales)


def without_resume(overrides: list[str]) -> list[str]:
    """The `KEY VALUE` overrides less any TRAIN.resume, whatever form it was written in."""
    return [token for key, raw in split_overrides(overrides) if key.rpartition(".")[2] != "resume"
            for token in (key, raw)]


def rerun_command(script: str, dataset: str, exp_name: str, overrides: list[str]) -> str:
    """`[EXP_ROOT=.. NPROC=.. PYTHON=..] sh <script> <dataset> <exp_name> <overrides but TRAIN.resume>`,
    or `sbatch <script> ...` for a SLURM batch script (one with #SBATCH lines): resubmitting resumes."""
    batch = "#SBATCH" in Path(script).read_text(encoding="utf-8", errors="replace")
    settings = [f"{name}={os.environ[name]}" for name in LAUNCHER_SETTINGS if os.environ.get(name)]
    return shlex.join([*settings, "sbatch" if batch else "sh", script, dataset, exp_name, *without_resume(overrides)])


def resume_command(argv: list[str], env: Mapping[str, str], launcher: str) -> str:
    """What continues the train.py run of `argv` (sys.argv): the command of the launcher that started it
    when that one resumes by default (RESUME_COMMAND_VARIABLE, set by tool/train.sh and
    tool/slurm_train.sh, and by train.py itself before a plain-python multi-GPU spawn), else the same
    train.py command with TRAIN.resume auto, under torchrun when `launcher` is torchrun."""
    if env.get(RESUME_COMMAND_VARIABLE):
        return env[RESUME_COMMAND_VARIABLE]
    parser = argparse.ArgumentParser(add_help=False)
    add_config_arguments(parser)
    args = parse_config_args(parser, argv[1:])
    start = ["python"]
    if launcher == "torchrun":
        start = ["torchrun", f"--nproc_per_node={env.get('LOCAL_WORLD_SIZE', '1')}"]
    return shlex.join([*start, argv[0], f"--config={args.config}", *without_resume(args.opts), "TRAIN.resume", "auto"])


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[1] not in ("paths", "rerun") or (sys.argv[1] == "rerun" and len(sys.argv) < 5):
        sys.exit(__doc__)
    if sys.argv[1] == "rerun":
        print(rerun_command(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]))
        return
    model_path, save_folder = evaluation_paths(sys.argv[2], sys.argv[3], sys.argv[4:])
    print(model_path)
    print(save_folder)


if __name__ == "__main__":
    run_main(main)
