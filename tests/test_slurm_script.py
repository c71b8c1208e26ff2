"""tool/slurm_train.sh without SLURM: stand-in `srun` and `scontrol` scripts on PATH record what the
job script asks of them. SIGUSR1 before the time limit reaches the training step, and a training
that stopped after saving (status 75) requeues the job; a finished training is evaluated instead."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO_ROOT
from util.preemption import STOPPED_STATUS

FAKE_SRUN = f"""#!/bin/bash
# training: record the command, then run until SIGUSR1 (as train.py saves and exits {STOPPED_STATUS}) or
# exit at once with $FAKE_TRAIN_STATUS; evaluation: record and succeed.
echo "$*" >> "$FAKE_LOG/srun"
case "$*" in *tool/test.py*) exit 0 ;; esac
[ -n "${{FAKE_TRAIN_STATUS:-}}" ] && exit "$FAKE_TRAIN_STATUS"
trap 'echo USR1 >> "$FAKE_LOG/srun"; exit {STOPPED_STATUS}' USR1
touch "$FAKE_LOG/training"
while :; do sleep 0.05; done
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$*" >> "$FAKE_LOG/scontrol"
"""


def job(tmp_path: Path, **env: str) -> subprocess.Popen:
    """The job script as sbatch runs it (bash, in the submission folder), with the stand-ins first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    python_dir = Path(sys.executable).parent  # the script's own `python -m util.experiment` calls
    full_env = {**os.environ, "PATH": f"{bin_dir}:{python_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path),
                "SLURM_JOB_ID": "4242", "EXP_ROOT": str(tmp_path / "exp"), **env}
    return subprocess.Popen(["bash", "tool/slurm_train.sh", "toy", "pspnet18", "TRAIN.epochs", "2"], cwd=REPO_ROOT,
                            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_the_job_asks_for_the_signal_and_may_be_requeued():
    header = (REPO_ROOT / "tool/slurm_train.sh").read_text()
    assert "#SBATCH --signal=B:USR1@" in header and "#SBATCH --requeue" in header


def test_sigusr1_before_the_time_limit_saves_and_requeues_the_job(tmp_path):
    run = job(tmp_path)
    deadline = time.monotonic() + 60
    while not (tmp_path / "training").exists():
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()[0]
        time.sleep(0.05)
    run.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends to the batch script
    output, _ = run.communicate(timeout=60)
    assert run.returncode == STOPPED_STATUS, output
    srun = (tmp_path / "srun").read_text().splitlines()
    assert srun[0].startswith("python tool/train.py --config=config/toy/toy_pspnet18.yaml")
    assert "TRAIN.resume auto TRAIN.epochs 2" in srun[0]
    assert srun[1:] == ["USR1"]  # passed on to the training step, and nothing evaluated
    assert (tmp_path / "scontrol").read_text().splitlines() == ["requeue 4242"]
    assert "requeueing job 4242" in output


def test_finished_training_is_evaluated_and_not_requeued(tmp_path):
    output, _ = job(tmp_path, FAKE_TRAIN_STATUS="0").communicate(timeout=60)
    srun = (tmp_path / "srun").read_text().splitlines()
    assert len(srun) == 2 and "tool/test.py" in srun[1] and "train_epoch_2.pth" in srun[1], output
    assert not (tmp_path / "scontrol").exists()


def test_failed_training_is_neither_evaluated_nor_requeued(tmp_path):
    run = job(tmp_path, FAKE_TRAIN_STATUS="1")
    output, _ = run.communicate(timeout=60)
    assert run.returncode == 1, output
    assert len((tmp_path / "srun").read_text().splitlines()) == 1 and not (tmp_path / "scontrol").exists()
