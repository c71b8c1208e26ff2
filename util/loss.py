"""Training loss: main + aux_weight * aux cross-entropy, ignoring ignore_label.

The loss is a sum over valid pixels divided by the number of valid pixels in the whole global
batch (all processes, all accumulated micro-batches), times the world size because DDP averages
gradients. With one process and no accumulation this is semseg's per-batch mean; with more it
gives the same gradient as that single process, whatever the split.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def label_at_output_size(label: torch.Tensor, zoom_factor: int) -> torch.Tensor:
    """Subsample an (N, H, W) label of side 8k+1 to the model output ((H-1)/8*zoom+1).

    semseg interpolates bilinearly with align_corners=True; at these sizes every sample falls on a
    pixel, so plain strided subsampling gives the same ids without mixing labels.
    """
    if zoom_factor == 8:
        return label
    step = 8 // zoom_factor
    return label[:, ::step, ::step]


def count_valid(labels: list[torch.Tensor], ignore_label: int) -> torch.Tensor:
    """Number of non-ignored pixels in a list of label tensors, as a tensor on their device."""
    return sum((lbl != ignore_label).sum() for lbl in labels)


def segmentation_loss(main: torch.Tensor, aux: torch.Tensor | None, target: torch.Tensor, aux_weight: float,
                      ignore_label: int, normaliser: torch.Tensor | float) -> tuple[torch.Tensor, ...]:
    """(total, main, aux) losses; logits are scored in float32 even under autocast."""
    main_loss = F.cross_entropy(main.float(), target, ignore_index=ignore_label, reduction="sum") / normaliser
    if aux is None or aux_weight == 0:
        return main_loss, main_loss, torch.zeros_like(main_loss)
    aux_loss = F.cross_entropy(aux.float(), target, ignore_index=ignore_label, reduction="sum") / normaliser
    return main_loss + aux_weight * aux_loss, main_loss, aux_loss

