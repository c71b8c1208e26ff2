"""PSANet: dilated ResNet + point-wise spatial attention, keyword- and checkpoint-compatible with semseg.

The PSA block works on a shrunk copy of the 1/8 feature. Each branch (collect `reduce`/`attention`,
distribute `reduce_p`/`attention_p`) predicts mask_h*mask_w attention weights per pixel, spreads
them into an (h*w) x (h*w) map (lib.psa.psa_mask, or read directly in compact mode), and
aggregates the reduced feature with it. The result is projected back to the feature width and
concatenated with the input before the usual cls/aux heads.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from lib.psa import psa_mask
from model.heads import SegmentationModel
from model.resnet import NormLayer
from util.errors import ConfigError

PSA_MID_CHANNELS = 512
PSA_TYPES = {0: ("collect",), 1: ("distribute",), 2: ("collect", "distribute")}
BRANCH_SUFFIXES = ("", "_p")


def default_psa_mask_size(side: int, compact: bool, shrink_factor: int) -> int:
    """semseg's mask side for a crop side: the shrunk feature side (compact) or 2x it minus 1."""
    feature_side = (side - 1) // (8 * shrink_factor) + 1
    return feature_side if compact else 2 * feature_side - 1


def check_psa_mask_side(value: int, key: str, side: int, compact: bool, shrink_factor: int) -> None:
    """A given mask side must be odd, >= 3 and <= default_psa_mask_size(side, ...) (ConfigError)."""
    bound = default_psa_mask_size(side, compact, shrink_factor)
    if not isinstance(value, int) or value < 3 or value % 2 == 0 or value > bound:
        raise ConfigError(f"{key}: expected an odd integer in [3, {bound}] (the bound follows from the crop "
                          f"side {side} and TRAIN.shrink_factor {shrink_factor}), got {value!r}")


def _check_psa_args(psa_type: int, compact: bool, shrink_factor: int, mask_h: int, mask_w: int) -> None:
    if psa_type not in PSA_TYPES:
        raise ConfigError(f"TRAIN.psa_type: expected 0 (collect), 1 (distribute) or 2 (both), got {psa_type!r}")
    if not isinstance(shrink_factor, int) or shrink_factor < 1:
        raise ConfigError(f"TRAIN.shrink_factor: expected a positive integer, got {shrink_factor!r}")
    for key, value in (("TRAIN.mask_h", mask_h), ("TRAIN.mask_w", mask_w)):
        if compact:
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key}: expected a positive integer, got {value!r}")
        elif not isinstance(value, int) or value < 3 or value % 2 == 0:
            raise ConfigError(f"{key}: expected an odd integer >= 3, got {value!r}")


def _conv_bn_relu(in_channels: int, out_channels: int, norm_layer: NormLayer) -> list:
    return [nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
            norm_layer(out_channels), nn.ReLU(inplace=True)]


class PointwiseSpatialAttention(nn.Module):
    """The PSA block; returns concat(input, attended feature) with twice the input's channels."""

    def __init__(self, in_channels: int = 2048, mid_channels: int = PSA_MID_CHANNELS, psa_type: int = 2,
                 compact: bool = False, shrink_factor: int = 2, mask_h: int = 59, mask_w: int = 59,
                 normalization_factor: Optional[float] = 1.0, psa_softmax: bool = True,
                 norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        _check_psa_args(psa_type, compact, shrink_factor, mask_h, mask_w)
        self.branches = PSA_TYPES[psa_type]
        self.compact = compact
        self.shrink_factor = shrink_factor
        self.mask_h, self.mask_w = mask_h, mask_w
        self.psa_softmax = psa_softmax
        # semseg treats a missing factor as "divide by the mask area".
        self.normalization_factor = float(mask_h * mask_w) if normalization_factor is None else normalization_factor
        # semseg names the first branch reduce/attention whatever its type, the second reduce_p/attention_p.
        for suffix in BRANCH_SUFFIXES[:len(self.branches)]:
            setattr(self, "reduce" + suffix, nn.Sequential(*_conv_bn_relu(in_channels, mid_channels, norm_layer)))
            setattr(self, "attention" + suffix, nn.Sequential(
                *_conv_bn_relu(mid_channels, mid_channels, norm_layer),
                nn.Conv2d(mid_channels, mask_h * mask_w, kernel_size=1, bias=False),
            ))
        self.proj = nn.Sequential(*_conv_bn_relu(mid_channels * len(self.branches), in_channels, norm_layer))

    def _branch_modules(self, index: int) -> Tuple[nn.Module, nn.Module]:
        suffix = BRANCH_SUFFIXES[index]
        return getattr(self, "reduce" + suffix), getattr(self, "attention" + suffix)

    def _attention_map(self, y: torch.Tensor, branch: str, height: int, width: int) -> torch.Tensor:
        """(N, mask_h*mask_w, h, w) attention logits -> (N, h*w source, h*w target) weights."""
        n = y.shape[0]
        if self.compact:
            if self.mask_h * self.mask_w != height * width:
                raise ConfigError(
                    f"compact PSA reads the attention as one weight per feature pixel, so TRAIN.mask_h x "
                    f"TRAIN.mask_w ({self.mask_h}x{self.mask_w}) must cover the shrunk feature map "
                    f"({height}x{width}); derive the mask from the crop (mask_h: null) or use that input size")
            y = y.reshape(n, height * width, height * width)
            if branch == "distribute":
                y = y.transpose(1, 2)
        else:
            y = psa_mask(y, branch, self.mask_h, self.mask_w).reshape(n, height * width, height * width)
        return F.softmax(y, dim=1) if self.psa_softmax else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, full_h, full_w = x.shape
        height, width = full_h, full_w
        if self.shrink_factor != 1:
            height = (full_h - 1) // self.shrink_factor + 1
            width = (full_w - 1) // self.shrink_factor + 1
        attended = []
        for index, branch in enumerate(self.branches):
            reduce, attention = self._branch_modules(index)
            feature = reduce(x)
            if self.shrink_factor != 1:
                feature = F.interpolate(feature, size=(height, width), mode="bilinear", align_corners=True)
            weights = self._attention_map(attention(feature), branch, height, width)
            channels = feature.shape[1]
            aggregated = torch.bmm(feature.reshape(n, channels, height * width), weights)
            attended.append(aggregated.view(n, channels, height, width) * (1.0 / self.normalization_factor))
        out = self.proj(torch.cat(attended, dim=1))
        if self.shrink_factor != 1:
            # semseg resizes to ((h - 1) * s + 1), which equals the input side whenever concatenation works.
            out = F.interpolate(out, size=(full_h, full_w), mode="bilinear", align_corners=True)
        return torch.cat([x, out], dim=1)


class PSANet(SegmentationModel):
    """PSANet (semseg keywords). forward(x, return_aux=False) -> logits or (logits, aux_logits).

    psa_type 0 = collect, 1 = distribute, 2 = both. compact reads the attention directly as an
    (h*w) x (h*w) map, so mask_h*mask_w must equal the shrunk feature area. pretrained and
    criterion behave as in PSPNet.
    """

    def __init__(self, layers: int = 50, dropout: float = 0.1, classes: int = 2, zoom_factor: int = 8,
                 use_psa: bool = True, psa_type: int = 2, compact: bool = False, shrink_factor: int = 2,
                 mask_h: int = 59, mask_w: int = 59, normalization_factor: Optional[float] = 1.0,
                 psa_softmax: bool = True, criterion: Optional[nn.Module] = None,
                 pretrained: Union[bool, str] = False, deep_stem: bool = True,
                 norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        self._init_backbone(layers, classes, zoom_factor, dropout, deep_stem, norm_layer, criterion)
        self.use_psa = use_psa
        context_channels = self.feature_channels
        if use_psa:
            self.psa = PointwiseSpatialAttention(
                self.feature_channels, PSA_MID_CHANNELS, psa_type, bool(compact), shrink_factor, mask_h, mask_w,
                normalization_factor, psa_softmax, norm_layer)
            context_channels *= 2
        self._init_heads(context_channels, dropout, norm_layer)
        self._load_pretrained_backbone(pretrained)

    def context(self, x: torch.Tensor) -> torch.Tensor:
        return self.psa(x) if self.use_psa else x
