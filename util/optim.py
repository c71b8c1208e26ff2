"""SGD with semseg's parameter groups and poly learning-rate decay.

The backbone (layer0..layer4) learns at base_lr and the new modules (ppm/psa, cls, aux) at 10x;
groups are chosen by module name through the model's parameter_groups(), never by index.
"""
from __future__ import annotations

import torch
from torch import nn

HEAD_LR_MULT = 10.0


def build_optimizer(model: nn.Module, base_lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    groups = model.parameter_groups()
    mults = {"backbone": 1.0, "head": HEAD_LR_MULT}
    param_groups = [{"params": params, "name": name, "lr_mult": mults[name], "lr": base_lr * mults[name]}
                    for name, params in groups.items() if params]
    return torch.optim.SGD(param_groups, lr=base_lr, momentum=momentum, weight_decay=weight_decay)


def poly_lr(base_lr: float, cur_iter: int, max_iter: int, power: float) -> float:
    """semseg's poly decay: base * (1 - cur_iter / max_iter) ** power."""
    return base_lr * (1.0 - cur_iter / max_iter) ** power


def set_poly_lr(optimizer: torch.optim.Optimizer, base_lr: float, cur_iter: int, max_iter: int,
                power: float) -> float:
    """Set every group's lr for the step after `cur_iter` (counted from 1); returns the backbone lr."""
    lr = poly_lr(base_lr, cur_iter, max_iter, power)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    return lr
