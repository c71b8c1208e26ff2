"""What PSPNet and PSANet share: dilated backbone wrapping, classifier heads, forward contract.

A segmentation net is layer0 (the ResNet stem) and layer1..layer4 of a ResNet with output stride 8,
a context module on the last feature (PSPNet's `ppm`, PSANet's `psa`), the main head `cls` and the
auxiliary head `aux` on layer3's output. Module names and order give semseg's state-dict keys.
"""
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from model.resnet import BACKBONE_MODULES, NormLayer, build_resnet
from model.imagenet_convert import load_backbone_weights
from util.errors import CheckpointError, ConfigError

ZOOM_FACTORS = (1, 2, 4, 8)
HEAD_MID_CHANNELS = 512
AUX_MID_CHANNELS = 256


def classifier_head(in_channels: int, mid_channels: int, classes: int, dropout: float,
                    norm_layer: NormLayer) -> nn.Sequential:
    """3x3 conv -> norm -> ReLU -> Dropout2d -> 1x1 conv to class scores (indices 0, 1, 4 hold weights)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=False),
        norm_layer(mid_channels),
        nn.ReLU(inplace=True),
        nn.Dropout2d(p=dropout),
        nn.Conv2d(mid_channels, classes, kernel_size=1),
    )


def output_size(height: int, width: int, zoom_factor: int) -> Tuple[int, int]:
    """semseg's logit size for an input of height x width: (side - 1) / 8 * zoom + 1."""
    return int((height - 1) / 8 * zoom_factor + 1), int((width - 1) / 8 * zoom_factor + 1)


def check_common_args(classes: int, zoom_factor: int, dropout: float) -> None:
    if not isinstance(classes, int) or classes < 1:
        raise ConfigError(f"DATA.classes: expected a positive integer, got {classes!r}")
    if zoom_factor not in ZOOM_FACTORS:
        raise ConfigError(f"TRAIN.zoom_factor: expected one of {list(ZOOM_FACTORS)}, got {zoom_factor!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"TRAIN.dropout: expected a probability in [0, 1), got {dropout!r}")


def check_pretrained_arg(pretrained: Union[bool, str, None]) -> Optional[str]:
    """semseg passes pretrained=True to download weights; here it must be a path (or False/'')."""
    if pretrained is True:
        raise CheckpointError("pretrained=True: nothing is downloaded; pass the path of the ImageNet "
                              "backbone weights instead (config key TRAIN.pretrained_backbone)")
    return pretrained or None


class SegmentationModel(nn.Module):
    """Base for dilated-ResNet segmentation nets; subclasses set the context module and heads.

    Subclass __init__ order (it fixes the state-dict key order): `_init_backbone`, the context
    module, then `_init_heads`. Subclasses implement `context(x)`.

    `criterion` is stored only so semseg-style constructor calls keep working; forward never
    computes a loss.
    """

    def _init_backbone(self, layers: int, classes: int, zoom_factor: int, dropout: float,
                       deep_stem: bool, norm_layer: NormLayer, criterion: Optional[nn.Module]) -> None:
        check_common_args(classes, zoom_factor, dropout)
        resnet = build_resnet(layers, deep_stem=deep_stem, output_stride=8, norm_layer=norm_layer)
        self.layers = layers
        self.classes = classes
        self.zoom_factor = zoom_factor
        self.deep_stem = deep_stem
        self.criterion = criterion
        self.layer0 = nn.Sequential(*resnet.stem_modules())
        self.layer1, self.layer2 = resnet.layer1, resnet.layer2
        self.layer3, self.layer4 = resnet.layer3, resnet.layer4
        self.feature_channels = resnet.inplanes
        self.aux_channels = resnet.inplanes // 2  # layer3 is half as wide as layer4 in every ResNet

    def _init_heads(self, context_channels: int, dropout: float, norm_layer: NormLayer) -> None:
        self.cls = classifier_head(context_channels, HEAD_MID_CHANNELS, self.classes, dropout, norm_layer)
        self.aux = classifier_head(self.aux_channels, AUX_MID_CHANNELS, self.classes, dropout, norm_layer)

    def _load_pretrained_backbone(self, pretrained: Union[bool, str, None]) -> None:
        path = check_pretrained_arg(pretrained)
        if path is not None:
            load_backbone_weights(self, path, "TRAIN.pretrained_backbone")

    def context(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, return_aux: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Logits (N, classes, h, w), h = (H - 1) / 8 * zoom_factor + 1; with return_aux also aux logits."""
        size = output_size(x.shape[2], x.shape[3], self.zoom_factor)
        x = self.layer2(self.layer1(self.layer0(x)))
        layer3_out = self.layer3(x)
        logits = self._resize(self.cls(self.context(self.layer4(layer3_out))), size)
        if not return_aux:
            return logits
        return logits, self._resize(self.aux(layer3_out), size)

    def _resize(self, logits: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        if self.zoom_factor == 1:
            return logits
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)

    def parameter_groups(self) -> Dict[str, List[nn.Parameter]]:
        """{'backbone': layer0..layer4 parameters, 'head': all others} (head trains at 10x lr)."""
        groups: Dict[str, List[nn.Parameter]] = {"backbone": [], "head": []}
        for name, param in self.named_parameters():
            group = "backbone" if name.split(".", 1)[0] in BACKBONE_MODULES else "head"
            groups[group].append(param)
        return groups
