"""Segmentation models and their construction from a flat config (TRAIN.* keys as attributes).

build_model(cfg) builds PSPNet (arch 'psp') or PSANet (arch 'psa'). It only creates modules (weights
are loaded by the caller: ImageNet initialisation in tool/train.py, checkpoints in load_eval_model), so
`with torch.device('meta'): build_model(cfg)` builds any size cheaply, e.g. to check keys.
"""
from typing import Any, Callable, Dict

import torch
from torch import nn

from model.psanet import PSANet, check_psa_mask_side, default_psa_mask_size
from model.pspnet import PSPNet
from model.resnet import BLOCKS_PER_DEPTH
from model.weights import load_model_weights
from util.errors import ConfigError


def _common_kwargs(cfg: Any) -> Dict[str, Any]:
    if cfg.layers not in BLOCKS_PER_DEPTH:
        raise ConfigError(f"TRAIN.layers: unsupported ResNet depth {cfg.layers!r}; "
                          f"expected one of {sorted(BLOCKS_PER_DEPTH)}")
    return dict(layers=cfg.layers, classes=cfg.classes, zoom_factor=cfg.zoom_factor, dropout=cfg.dropout,
                deep_stem=bool(cfg.deep_stem))


def build_pspnet(cfg: Any) -> nn.Module:
    return PSPNet(bins=tuple(cfg.bins), **_common_kwargs(cfg))


def psa_mask_sides(cfg: Any) -> Dict[str, int]:
    """mask_h / mask_w: derived from the crop when both are None (always so in compact mode), else checked."""
    given = {"mask_h": cfg.mask_h, "mask_w": cfg.mask_w}
    if (given["mask_h"] is None) != (given["mask_w"] is None):
        raise ConfigError(f"TRAIN.mask_h and TRAIN.mask_w: give both or neither (null derives them from "
                          f"train_h/train_w), got mask_h={cfg.mask_h!r}, mask_w={cfg.mask_w!r}")
    sides = {}
    for key, crop_key in (("mask_h", "train_h"), ("mask_w", "train_w")):
        crop_side = getattr(cfg, crop_key)
        derived = default_psa_mask_size(crop_side, bool(cfg.compact), cfg.shrink_factor)
        value = given[key]
        if value is None:
            value = derived
        elif cfg.compact and value != derived:
            raise ConfigError(f"TRAIN.{key}: compact PSA needs the shrunk feature side {derived} for "
                              f"TRAIN.{crop_key} {crop_side}, got {value}; leave it null to derive it")
        elif not cfg.compact:
            check_psa_mask_side(value, f"TRAIN.{key}", crop_side, False, cfg.shrink_factor)
        sides[key] = value
    return sides


def build_psanet(cfg: Any) -> nn.Module:
    return PSANet(psa_type=cfg.psa_type, compact=bool(cfg.compact), shrink_factor=cfg.shrink_factor,
                  normalization_factor=cfg.normalization_factor, psa_softmax=bool(cfg.psa_softmax),
                  **psa_mask_sides(cfg), **_common_kwargs(cfg))


ARCHS: Dict[str, Callable[[Any], nn.Module]] = {"psp": build_pspnet, "psa": build_psanet}


def load_eval_model(cfg: Any, device: torch.device) -> nn.Module:
    """The trained network of TEST.model_path on `device`, in eval mode (tool/test.py, tool/demo.py)."""
    model = build_model(cfg)
    load_model_weights(model, cfg.model_path, "TEST.model_path", trust_pickle=cfg.trust_pickle)
    model = model.to(device).eval()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_model(cfg: Any) -> nn.Module:
    """The network named by cfg.arch, configured from cfg's flat attributes."""
    if cfg.arch not in ARCHS:
        raise ConfigError(f"TRAIN.arch: unknown architecture {cfg.arch!r}; expected one of {sorted(ARCHS)}")
    return ARCHS[cfg.arch](cfg)
