"""PSPNet: dilated ResNet + pyramid pooling module, keyword- and checkpoint-compatible with semseg."""
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from model.heads import SegmentationModel
from model.resnet import NormLayer
from util.errors import ConfigError


class PyramidPooling(nn.Module):
    """Pool the feature to each bin size, reduce it, upsample back and concatenate with the input."""

    def __init__(self, in_channels: int, reduction_channels: int, bins: Sequence[int],
                 norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        self.features = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(bin_size),
                nn.Conv2d(in_channels, reduction_channels, kernel_size=1, bias=False),
                norm_layer(reduction_channels),
                nn.ReLU(inplace=True),
            )
            for bin_size in bins
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        pooled = [F.interpolate(branch(x), size=size, mode="bilinear", align_corners=True)
                  for branch in self.features]
        return torch.cat([x, *pooled], dim=1)


class PSPNet(SegmentationModel):
    """PSPNet (semseg keywords). forward(x, return_aux=False) -> logits or (logits, aux_logits).

    pretrained: False/'' or the path of ImageNet backbone weights (loaded via model.weights);
    True is an error because nothing is downloaded. criterion is kept for semseg keyword
    compatibility only and is not used by forward.
    """

    def __init__(self, layers: int = 50, bins: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1,
                 classes: int = 2, zoom_factor: int = 8, use_ppm: bool = True,
                 criterion: Optional[nn.Module] = None, pretrained: Union[bool, str] = False,
                 deep_stem: bool = True, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        self._init_backbone(layers, classes, zoom_factor, dropout, deep_stem, norm_layer, criterion)
        self.use_ppm = use_ppm
        context_channels = self.feature_channels
        if use_ppm:
            bins = tuple(bins)
            if not bins or any(not isinstance(b, int) or b < 1 for b in bins):
                raise ConfigError(f"TRAIN.bins: expected a non-empty list of positive integers, got {list(bins)}")
            self.ppm = PyramidPooling(self.feature_channels, self.feature_channels // len(bins), bins, norm_layer)
            context_channels *= 2
        self._init_heads(context_channels, dropout, norm_layer)
        self._load_pretrained_backbone(pretrained)

    def context(self, x: torch.Tensor) -> torch.Tensor:
        return self.ppm(x) if self.use_ppm else x
