"""Training checkpoints: atomic writes, keep-last-K plus best, and `resume auto`.

Layout (semseg's, extended): save_path/train_epoch_<n>.pth holding {'epoch', 'state_dict' (keys
with the 'module.' prefix, as semseg saved them), 'optimizer', 'scaler', 'iteration',
'best_miou', 'rng', 'config'}, so semseg's test.py loads our files (and TRAIN.resume takes
semseg's); save_path/best.pth is the checkpoint with the best validation mIoU.
save_path/train_epoch_<e>_step_<s>.pth is a mid-epoch checkpoint (epoch e, 1-based as the log
counts it, after its step s; 'epoch' then holds the epochs done and 'epoch_step' s): written on a
stop request or every TRAIN.checkpoint_minutes, only the newest one is kept. A file is written to
a hidden temporary name, flushed to disk and renamed, so a crash or a full disk never leaves a
truncated file under a final name, and `resume auto` only ever sees complete files.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from util.errors import CheckpointError, UserError

logger = logging.getLogger(__name__)
EPOCH_FILE = re.compile(r"^train_epoch_(\d+)\.pth$")
MID_EPOCH_FILE = re.compile(r"^train_epoch_(\d+)_step_(\d+)\.pth$")
TEMPORARY_FILE = re.compile(r"^\..+\.tmp\d+$")  # atomic_save's name while writing
# How torch.save reports a write that failed (a full disk; "unexpected pos" when a file object raised)
TORCH_WRITER_ERRORS = ("PytorchStreamWriter", "inline_container")
BEST_FILE = "best.pth"
RUN_RECORD = re.compile(r"^(train-.+\.log|events\.out\.tfevents\..+)$")  # a run's log and TensorBoard files
SEMSEG_STATE_KEYS = ("epoch", "state_dict", "optimizer")  # what semseg's train.py saved
TRAINING_STATE_KEYS = SEMSEG_STATE_KEYS + ("scaler", "best_miou", "rng")


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save turns a failed write (full disk) into a RuntimeError
        tmp.unlink(missing_ok=True)
        if isinstance(e, RuntimeError) and not any(writer in str(e) for writer in TORCH_WRITER_ERRORS):
            raise  # not the write: an error of the process reported while it saved
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
        raise CheckpointError(f"could not write checkpoint {path} ({reason}){_free_space(path.parent)}; "
                              f"earlier checkpoints in {path.parent} are intact") from None
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def _free_space(folder: Path) -> str:
    try:
        return f"; {shutil.disk_usage(folder).free / 2**20:.0f} MiB free on its disk"
    except OSError:
        return ""


def remove_stale_temporaries(save_path: str | Path) -> list[Path]:
    """Delete what atomic_save left behind when its process was killed mid-write; call at start-up,
    before this run saves anything. Such files are never read (their names are not final) but
    each is as big as a checkpoint."""
    folder = Path(save_path)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if TEMPORARY_FILE.match(p.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def epoch_checkpoints(save_path: str | Path) -> list[tuple[int, Path]]:
    """Complete epoch checkpoints in save_path, oldest first."""
    folder = Path(save_path)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := EPOCH_FILE.match(p.name))]
    return sorted(found)


def mid_epoch_file(save_path: str | Path, epochs_done: int, step: int) -> Path:
    """Where the checkpoint after `step` global steps of epoch epochs_done + 1 goes."""
    return Path(save_path) / f"train_epoch_{epochs_done + 1}_step_{step}.pth"


def training_checkpoints(save_path: str | Path) -> list[tuple[tuple[int, int], Path]]:
    """Complete epoch and mid-epoch checkpoints, oldest first, each with its position
    (epochs done, steps into the next epoch)."""
    folder = Path(save_path)
    if not folder.is_dir():
        return []
    found = [((epochs, 0), path) for epochs, path in epoch_checkpoints(folder)]
    found += [((int(m.group(1)) - 1, int(m.group(2))), p) for p in folder.iterdir()
              if (m := MID_EPOCH_FILE.match(p.name))]
    return sorted(found)


def prune_mid_epoch(save_path: str | Path, newest: Path) -> None:
    """Delete every mid-epoch checkpoint but `newest`."""
    for path in Path(save_path).iterdir():
        if MID_EPOCH_FILE.match(path.name) and path.name != newest.name:
            path.unlink(missing_ok=True)


def prune_checkpoints(save_path: str | Path, keep: int) -> None:
    """Delete all but the `keep` newest epoch checkpoints (best.pth is a separate file)."""
    for _, path in epoch_checkpoints(save_path)[:-keep]:
        path.unlink(missing_ok=True)


def archive_checkpoints_after(save_path: str | Path, position: tuple[int, int]) -> Path | None:
    """An explicit TRAIN.resume from an earlier point than save_path's newest checkpoint: move the
    checkpoints past `position` (epochs done, steps into the next) to save_path/previous-<time>/, so
    that pruning keeps this run's new files rather than those, and `resume auto` (a restart, a
    requeue) never goes back to the abandoned branch."""
    return move_aside(save_path, [path for where, path in training_checkpoints(save_path) if where > position])


def move_aside(save_path: str | Path, paths: list[Path]) -> Path | None:
    """Move `paths` into save_path/previous-<time>/ (nothing is deleted); that folder, or None."""
    if not paths:
        return None
    archive = Path(save_path) / time.strftime("previous-%Y%m%d_%H%M%S")
    archive.mkdir(exist_ok=True)
    for path in paths:
        os.replace(path, archive / path.name)
    return archive


def archive_previous_run(save_path: str | Path, current_log: str | Path | None = None) -> Path | None:
    """A fresh run (no resume) in a save_path that holds another run's checkpoints: move those, with
    that run's logs and TensorBoard events, into save_path/previous-<time>/ so that nothing is lost,
    pruning cannot delete this run's files, `resume auto` never continues from the other run and
    TensorBoard does not draw the two runs as one. `current_log` (this run's log) stays."""
    folder = Path(save_path)
    old = [p for _, p in training_checkpoints(folder)] + [p for p in (folder / BEST_FILE,) if p.is_file()]
    if not old:
        return None
    keep = Path(current_log).resolve() if current_log is not None else None
    old += [p for p in folder.iterdir() if RUN_RECORD.match(p.name) and p.is_file() and p.resolve() != keep]
    return move_aside(folder, old)


def checkpoints_to_come(save_path: str | Path, keep: int, mid_epoch: bool = False) -> int:
    """How many more checkpoint-sized files save_path must take at a save's peak: `keep` epoch files,
    the new one, best.pth and its replacement while written (and with mid_epoch, the mid-epoch file
    and its replacement), less those already there."""
    folder = Path(save_path)
    present = min(len(epoch_checkpoints(folder)), keep) + (folder / BEST_FILE).is_file()
    if mid_epoch:
        present += any(MID_EPOCH_FILE.match(p.name) for p in folder.iterdir()) if folder.is_dir() else 0
    return keep + 3 + 2 * mid_epoch - present


def resolve_resume(resume: str, save_path: str | Path) -> Path | None:
    """TRAIN.resume: '' -> None; 'auto' -> newest complete checkpoint in save_path (epoch or mid-epoch)
    or None; else the path."""
    if not resume:
        return None
    if resume == "auto":
        found = training_checkpoints(save_path)
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.exists():  # a folder is named as such when loaded
        raise CheckpointError(f"TRAIN.resume: checkpoint {path} does not exist")
    return path


def training_checkpoint_kind(checkpoint: Any, path: str | Path) -> str:
    """'ours' for a file of tool/train.py, 'semseg' for semseg's {'epoch', 'state_dict', 'optimizer'};
    anything else (weights alone) is a CheckpointError, since TRAIN.resume needs the optimizer too."""
    present = set(checkpoint) if isinstance(checkpoint, dict) else set()
    if present >= set(TRAINING_STATE_KEYS):
        return "ours"
    if present >= set(SEMSEG_STATE_KEYS):
        return "semseg"
    missing = [key for key in SEMSEG_STATE_KEYS if key not in present]
    raise CheckpointError(f"TRAIN.resume: {path} is not a training checkpoint of tool/train.py or semseg (it lacks "
                          f"{', '.join(missing)}); to start from its weights, use TRAIN.weight instead")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # this process's device only: the next run may see other GPUs
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def with_module_prefix(state_dict: dict) -> dict:
    """semseg saved from a DDP wrapper; keep that layout so its tools load our files too."""
    return {k if k.startswith("module.") else f"module.{k}": v for k, v in state_dict.items()}


def check_writable(folder: str | Path, config_key: str, need_bytes: int = 0) -> None:
    """Fail before any work if outputs cannot be written: not creatable, not writable or too full."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_probe{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{config_key} {folder} is not writable: {e.strerror or e}") from None
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise UserError(f"{config_key} {folder}: only {free / 2**20:.0f} MiB free on its disk, "
                        f"about {need_bytes / 2**20:.0f} MiB needed for checkpoints")
