"""ResNet backbones: classification nets and the dilated variants used by segmentation models.

Parameter names match semseg's ImageNet checkpoints (keys/resnet50_deepstem_imagenet.keys): a deep
stem conv1/bn1, conv2/bn2, conv3/bn3 (or a 7x7 conv1/bn1), layer1..layer4, fc.

output_stride=8 reproduces semseg's dilated net: every block of layer3 uses dilation 2 and every
block of layer4 dilation 4 (the first block included), with no stride in the 3x3 or downsample
convs. output_stride=16 dilates only layer4 (by 2).
"""
from typing import Callable, List, Sequence, Type, Union

import torch
from torch import nn

from util.errors import ConfigError

NormLayer = Callable[[int], nn.Module]

# Names under which segmentation nets hold the backbone (layer0 is the stem); the rest is head.
BACKBONE_MODULES = ("layer0", "layer1", "layer2", "layer3", "layer4")

# (stride, dilation) of layer2, layer3, layer4 for each output stride.
_STAGE_GEOMETRY = {
    32: ((2, 1), (2, 1), (2, 1)),
    16: ((2, 1), (2, 1), (1, 2)),
    8: ((2, 1), (1, 2), (1, 4)),
}


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution whose padding keeps the size (divided by stride) for any dilation."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34); both are dilated in a dilated stage."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: Union[nn.Module, None] = None, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride and dilation here) -> 1x1 with 4x expansion (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: Union[nn.Module, None] = None, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = Type[Union[BasicBlock, Bottleneck]]


class ResNet(nn.Module):
    """ResNet with a deep (three 3x3 convs) or 7x7 stem and a configurable output stride."""

    def __init__(self, block: Block, layers: Sequence[int], deep_stem: bool = True,
                 output_stride: int = 32, norm_layer: NormLayer = nn.BatchNorm2d,
                 num_classes: int = 1000):
        super().__init__()
        if output_stride not in _STAGE_GEOMETRY:
            raise ValueError(f"output_stride must be one of {sorted(_STAGE_GEOMETRY)}, got {output_stride}")
        self.deep_stem = deep_stem
        self.relu = nn.ReLU(inplace=True)
        if deep_stem:
            self.conv1 = conv3x3(3, 64, stride=2)
            self.bn1 = norm_layer(64)
            self.conv2 = conv3x3(64, 64)
            self.bn2 = norm_layer(64)
            self.conv3 = conv3x3(64, 128)
            self.bn3 = norm_layer(128)
            self.inplanes = 128
        else:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = norm_layer(64)
            self.inplanes = 64
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        geometry = _STAGE_GEOMETRY[output_stride]
        self.layer1 = self._make_layer(block, 64, layers[0], 1, 1, norm_layer)
        self.layer2 = self._make_layer(block, 128, layers[1], *geometry[0], norm_layer)
        self.layer3 = self._make_layer(block, 256, layers[2], *geometry[1], norm_layer)
        self.layer4 = self._make_layer(block, 512, layers[3], *geometry[2], norm_layer)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self._init_weights()

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int, dilation: int,
                    norm_layer: NormLayer) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                norm_layer(planes * block.expansion),
            )
        stage = [block(self.inplanes, planes, stride, dilation, downsample, norm_layer)]
        self.inplanes = planes * block.expansion
        stage += [block(self.inplanes, planes, 1, dilation, None, norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stem_modules(self) -> List[nn.Module]:
        """The stem in execution order (what segmentation nets wrap as layer0)."""
        if self.deep_stem:
            return [self.conv1, self.bn1, self.relu, self.conv2, self.bn2, self.relu,
                    self.conv3, self.bn3, self.relu, self.maxpool]
        return [self.conv1, self.bn1, self.relu, self.maxpool]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.stem_modules():
            x = module(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.forward_features(x))
        return self.fc(torch.flatten(x, 1))


BLOCKS_PER_DEPTH = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


def build_resnet(layers: int, **kwargs) -> ResNet:
    """ResNet of the given depth; an unsupported depth is a ConfigError naming TRAIN.layers."""
    if layers not in BLOCKS_PER_DEPTH:
        raise ConfigError(f"TRAIN.layers: unsupported ResNet depth {layers!r}; "
                          f"expected one of {sorted(BLOCKS_PER_DEPTH)}")
    block, counts = BLOCKS_PER_DEPTH[layers]
    return ResNet(block, counts, **kwargs)


def resnet18(**kwargs) -> ResNet:
    return build_resnet(18, **kwargs)


def resnet34(**kwargs) -> ResNet:
    return build_resnet(34, **kwargs)


def resnet50(**kwargs) -> ResNet:
    return build_resnet(50, **kwargs)


def resnet101(**kwargs) -> ResNet:
    return build_resnet(101, **kwargs)


def resnet152(**kwargs) -> ResNet:
    return build_resnet(152, **kwargs)
