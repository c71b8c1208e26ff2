"""Segmentation metrics from one confusion matrix: per-class IoU and accuracy, mIoU, mAcc, allAcc.

The definitions are semseg's (intersection / union / target areas with ignore_label excluded),
with one deliberate difference: a class with no pixels in the ground truth and none in the
prediction over the whole set has no IoU; it is reported as n/a (NaN) and left out of mIoU, where
semseg counted it as 0. Likewise a class absent from the ground truth has no accuracy (n/a, left out
of mAcc). The matrix is a bincount on numpy arrays or torch tensors (on their device), and merges
across processes by summation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


def confusion_matrix(pred, target, classes: int, ignore_label: int):
    """(classes, classes) int64 counts, rows = ground truth, columns = prediction.

    Pixels whose target is ignore_label are skipped; pred values must be in 0..classes-1.
    Works on numpy arrays and on torch tensors (result on the same device).
    """
    if isinstance(pred, torch.Tensor):
        # Ignored pixels go to one extra bin instead of being masked out, and the counts are a
        # scatter-add into a fixed-size tensor: unlike boolean indexing or torch.bincount, nothing
        # waits for the GPU, so training can count every step without stalling.
        cells = classes * classes
        index = torch.where(target != ignore_label, target.long() * classes + pred.long(), cells).flatten()
        counts = torch.zeros(cells + 1, dtype=torch.long, device=index.device)
        counts.index_add_(0, index, torch.ones_like(index))
        return counts[:cells].reshape(classes, classes)
    pred, target = np.asarray(pred), np.asarray(target)
    valid = target != ignore_label
    index = target[valid].astype(np.int64) * classes + pred[valid].astype(np.int64)
    return np.bincount(index, minlength=classes * classes).reshape(classes, classes)


@dataclass
class SegScores:
    """Areas and scores of a confusion matrix; NaN marks a class that has no score (n/a)."""
    intersection: np.ndarray
    union: np.ndarray
    target: np.ndarray
    iou: np.ndarray
    acc: np.ndarray
    miou: float
    macc: float
    allacc: float

    def as_dict(self, names: list[str] | None = None) -> dict:
        """JSON-ready: NaN becomes None."""
        names = names or [str(i) for i in range(len(self.iou))]

        def clean(x):
            return None if np.isnan(x) else float(x)
        return {
            "mIoU": clean(self.miou), "mAcc": clean(self.macc), "allAcc": clean(self.allacc),
            "classes": [{"id": i, "name": n, "iou": clean(self.iou[i]), "acc": clean(self.acc[i]),
                         "intersection": int(self.intersection[i]), "union": int(self.union[i]),
                         "target": int(self.target[i])} for i, n in enumerate(names)],
        }


def _nanmean(x: np.ndarray) -> float:
    return float(np.mean(x[~np.isnan(x)])) if np.any(~np.isnan(x)) else float("nan")


def scores_from_confusion(conf) -> SegScores:
    """semseg's IoU / accuracy definitions, from a confusion matrix (rows truth, cols prediction)."""
    conf = conf.cpu().numpy() if isinstance(conf, torch.Tensor) else np.asarray(conf)
    conf = conf.astype(np.int64)
    intersection = np.diag(conf)
    target = conf.sum(axis=1)
    union = target + conf.sum(axis=0) - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, intersection / np.maximum(union, 1), np.nan)
        acc = np.where(target > 0, intersection / np.maximum(target, 1), np.nan)
    total = target.sum()
    allacc = float(intersection.sum() / total) if total > 0 else float("nan")
    return SegScores(intersection, union, target, iou, acc, _nanmean(iou), _nanmean(acc), allacc)


class ConfusionMatrix:
    """Accumulates a confusion matrix on the device of the first update; merge with reduce()."""

    def __init__(self, classes: int, ignore_label: int, device: torch.device | str = "cpu"):
        self.classes = classes
        self.ignore_label = ignore_label
        self.device = torch.device(device)  # where an empty matrix lives: NCCL reduces CUDA tensors only
        self.mat: torch.Tensor | None = None

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """pred: class ids (or logits of shape (N, C, H, W), reduced by argmax); target: same H, W.
        Returns this update's own counts (one image's matrix, for per-image scores)."""
        if pred.dim() == target.dim() + 1:
            pred = pred.argmax(1)
        counts = confusion_matrix(pred, target, self.classes, self.ignore_label)
        self.mat = counts if self.mat is None else self.mat + counts
        return counts

    def update_numpy(self, pred: np.ndarray, target: np.ndarray) -> torch.Tensor:
        return self.update(torch.from_numpy(np.asarray(pred)), torch.from_numpy(np.asarray(target)))

    def reduce(self) -> None:
        """Sum the matrices of all processes (all must call this); no-op without a process group."""
        if self.mat is None:  # this process saw no images (more processes than images)
            self.mat = torch.zeros(self.classes, self.classes, dtype=torch.long, device=self.device)
        self.mat = self.mat.to(self.device)  # update_numpy counts on the CPU, and NCCL reduces CUDA tensors only
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.mat)

    def compute(self) -> SegScores:
        if self.mat is None:
            return scores_from_confusion(np.zeros((self.classes, self.classes), np.int64))
        return scores_from_confusion(self.mat)


def format_scores_table(scores: SegScores, names: list[str] | None = None) -> str:
    """Per-class IoU / accuracy lines with names, then the means: the evaluation report."""
    names = names or [str(i) for i in range(len(scores.iou))]
    width = max(12, max(len(n) for n in names))

    def pct(x):
        return "   n/a" if np.isnan(x) else f"{x:.4f}"
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'acc':>6}"]
    lines += [f"{n:<{width}}  {pct(i):>6}  {pct(a):>6}" for n, i, a in zip(names, scores.iou, scores.acc)]
    lines.append(f"mIoU {pct(scores.miou)}  mAcc {pct(scores.macc)}  allAcc {pct(scores.allacc)}")
    return "\n".join(lines)
