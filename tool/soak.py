"""Soak test: many short epochs with a checkpoint and an evaluation after each, on tiny toy data,
while the training process's memory (VmRSS) and open file descriptors are sampled from /proc.

  python tool/soak.py                                   (40 epochs, about a minute on 2 free cores)
  python tool/soak.py --epochs 200 --workers 4 TRAIN.batch_size 8      (extra overrides for train.py)

Samples taken during the first --warmup-epochs are ignored (allocator pools, worker start-up). The
growth is the median of the last fifth of the remaining samples minus the median of their first
fifth. Exit status 0 when both growths are within the limits, 1 when one is not, 2 when training
itself failed. Linux only (reads /proc/<pid>/status and /proc/<pid>/fd).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from util.memory import status_mib  # noqa: E402
from util.toy_data import generate_toy_dataset  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SAVED_MARK = "INFO] saved "  # tool/train.py logs this once per checkpoint, i.e. once per epoch here


@dataclass(frozen=True)
class Sample:
    seconds: float
    epochs_done: int
    rss_mib: float
    fds: int


@dataclass(frozen=True)
class Growth:
    rss_start_mib: float
    rss_end_mib: float
    fds_start: float
    fds_end: float
    samples: int

    @property
    def rss_mib(self) -> float:
        return self.rss_end_mib - self.rss_start_mib

    @property
    def fds(self) -> float:
        return self.fds_end - self.fds_start


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40, help="training epochs (one checkpoint + evaluation each)")
    parser.add_argument("--warmup-epochs", type=int, default=3, help="epochs whose samples are ignored")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("--workers", type=int, default=2, help="TRAIN.workers (data-loader processes)")
    parser.add_argument("--max-rss-growth-mib", type=float, default=64.0, help="allowed VmRSS growth")
    parser.add_argument("--max-fd-growth", type=float, default=4.0, help="allowed growth of open descriptors")
    parser.add_argument("--workdir", default="", help="keep data, checkpoints and logs here (default: a temp dir)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="extra `SECTION.key value` overrides for train.py")
    args = parser.parse_args(argv)
    if args.epochs <= args.warmup_epochs + 1:
        parser.error(f"--epochs {args.epochs} must exceed --warmup-epochs {args.warmup_epochs} by at least 2")
    return args


def read_rss_mib(pid: int) -> float:
    rss = status_mib(pid, "VmRSS")
    if rss is None:
        raise ProcessLookupError(pid)
    return rss


def count_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def measure_growth(samples: list[Sample], warmup_epochs: int) -> Growth:
    """Median of the last fifth minus median of the first fifth of the samples after warm-up."""
    steady = [s for s in samples if s.epochs_done >= warmup_epochs]
    if len(steady) < 10:
        raise ValueError(f"only {len(steady)} samples after {warmup_epochs} warm-up epochs; "
                         "lower --interval or raise --epochs")
    fifth = len(steady) // 5
    head, tail = steady[:fifth], steady[-fifth:]
    return Growth(statistics.median(s.rss_mib for s in head), statistics.median(s.rss_mib for s in tail),
                  statistics.median(s.fds for s in head), statistics.median(s.fds for s in tail), len(steady))


def write_soak_config(folder: Path, data_root: Path, epochs: int, workers: int) -> Path:
    """Layers-18 PSPNet on 33-px crops: each epoch is a few steps, a checkpoint and an evaluation."""
    cfg = {
        "DATA": {"data_root": str(data_root), "train_list": str(data_root / "train.txt"),
                 "val_list": str(data_root / "val.txt"), "classes": 6},
        "TRAIN": {"arch": "psp", "layers": 18, "train_h": 33, "train_w": 33, "batch_size": 4, "batch_size_val": 4,
                  "epochs": epochs, "manual_seed": 1, "print_freq": 1000, "workers": workers, "save_freq": 1,
                  "keep_checkpoints": 2, "evaluate": True, "save_path": str(folder / "model"),
                  "pretrained_backbone": "none"},
    }
    path = folder / "soak.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_and_sample(cfg: Path, opts: list[str], log_path: Path, interval: float) -> tuple[int, list[Sample]]:
    """Run tool/train.py, sampling its /proc entries until it exits; returns (exit status, samples)."""
    samples: list[Sample] = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "tool" / "train.py"), f"--config={cfg}", *opts],
                                cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})  # epoch marks as they happen
    start = time.monotonic()
    while proc.poll() is None:
        try:
            rss, fds = read_rss_mib(proc.pid), count_fds(proc.pid)
        except (FileNotFoundError, ProcessLookupError):
            break  # it has just exited
        epochs_done = log_path.read_text(errors="replace").count(SAVED_MARK)
        samples.append(Sample(time.monotonic() - start, epochs_done, rss, fds))
        time.sleep(interval)
    return proc.wait(), samples


def epoch_table(samples: list[Sample]) -> str:
    """The last sample of every epoch: how RSS and descriptors evolve."""
    last: dict[int, Sample] = {}
    for sample in samples:
        last[sample.epochs_done] = sample
    rows = [f"{'epochs done':>11} {'seconds':>8} {'RSS MiB':>8} {'fds':>4}"]
    rows += [f"{s.epochs_done:>11} {s.seconds:>8.1f} {s.rss_mib:>8.1f} {s.fds:>4}" for s in last.values()]
    return "\n".join(rows)


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="semseg_soak_") as scratch:
        folder = Path(args.workdir or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        data_root = folder / "toy"
        generate_toy_dataset(data_root, seed=0, n_train=8, n_val=4, size_range=(48, 64))
        cfg = write_soak_config(folder, data_root, args.epochs, args.workers)
        log_path = folder / "train.log"
        print(f"soak: {args.epochs} epochs, a checkpoint and an evaluation after each; log {log_path}", flush=True)
        status, samples = run_and_sample(cfg, args.opts, log_path, args.interval)
        if status != 0:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
            print(f"soak: training failed with exit status {status}:\n{tail}", file=sys.stderr)
            return 2
        print(epoch_table(samples))
        growth = measure_growth(samples, args.warmup_epochs)
    too_much = growth.rss_mib > args.max_rss_growth_mib or growth.fds > args.max_fd_growth
    print(f"soak: {len(samples)} samples in {samples[-1].seconds:.0f} s, {growth.samples} after warm-up; "
          f"RSS {growth.rss_start_mib:.1f} -> {growth.rss_end_mib:.1f} MiB (growth {growth.rss_mib:+.1f}, "
          f"limit {args.max_rss_growth_mib:g}); open fds {growth.fds_start:g} -> {growth.fds_end:g} "
          f"(growth {growth.fds:+g}, limit {args.max_fd_growth:g}): {'FAIL' if too_much else 'ok'}")
    return 1 if too_much else 0


if __name__ == "__main__":
    sys.exit(main())
