"""SGD with semseg's parameter groups and poly learning-rate decay.

The backbone (layer0..layer4) learns at base_lr and the new modules (ppm/psa, cls, aux) at 10x;
groups are chosen by module name through the model's parameter_groups(), never by index.
semseg made one group per module (8), we make one per learning rate (2); the optimizer state of
its checkpoints converts to ours (optimizer_state_from_semseg).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from model.resnet import BACKBONE_MODULES
from util.errors import CheckpointError

HEAD_LR_MULT = 10.0
HEAD_MODULES = ("cls", "aux")  # after the context module, ppm (PSPNet) or psa (PSANet)


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


def semseg_group_modules(model: nn.Module) -> tuple[str, ...]:
    """The modules of semseg's 8 SGD groups, in its order: layer0..layer4, ppm or psa, cls, aux."""
    context = "ppm" if hasattr(model, "ppm") else "psa"
    return BACKBONE_MODULES + (context,) + HEAD_MODULES


def optimizer_state_from_semseg(saved: dict, model: nn.Module, path: str | Path) -> dict:
    """semseg's SGD state_dict (one group per module) as the state_dict of build_optimizer(model).

    Both list parameters module by module in the same order (module.parameters() within each), so
    the running indices of semseg's per-parameter `state` (the momentum buffers) are ours too: only
    the groups merge. The group sizes are checked against the model's modules.
    """
    modules = semseg_group_modules(model)
    groups = saved.get("param_groups", []) if isinstance(saved, dict) else []
    if len(groups) != len(modules):
        raise CheckpointError(f"TRAIN.resume: the optimizer in {path} has {len(groups)} parameter groups; a semseg "
                              f"checkpoint of this model has {len(modules)} ({', '.join(modules)})")
    for name, group in zip(modules, groups):
        expected = sum(1 for _ in getattr(model, name).parameters())
        if len(group["params"]) != expected:
            raise CheckpointError(f"TRAIN.resume: the optimizer group of {name} in {path} holds {len(group['params'])} "
                                  f"parameters but the model's {name} has {expected}; check TRAIN.arch, layers and "
                                  f"the PSA settings against the checkpoint")
    backbone = len(BACKBONE_MODULES)
    return {"state": saved["state"],
            "param_groups": [_merged_group(groups[:backbone], "backbone", 1.0),
                             _merged_group(groups[backbone:], "head", HEAD_LR_MULT)]}


def _merged_group(groups: list[dict], name: str, lr_mult: float) -> dict:
    """One group holding the parameters of `groups`, with the first one's hyperparameters (semseg
    gave all groups of one learning rate the same)."""
    settings = {key: value for key, value in groups[0].items() if key != "params"}
    return {**settings, "params": [index for group in groups for index in group["params"]],
            "name": name, "lr_mult": lr_mult}
