"""ResNet / ResNeXt builders with torchvision's architecture and ``state_dict`` keys.

``fused=True`` (the default) returns the model converted to the fused kernels; the
weights are initialised as torchvision does (Kaiming normal convs, BN weight 1, bias 0).
torchvision checkpoints load directly: ``model.load_state_dict(torch.load(path))``.
"""
from typing import List, Optional

import torch
from torch import nn

from .convert import convert


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (ResNet v1.5: the stride sits in the 3x3 convolution)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ``ResNet`` restricted to bottleneck blocks."""

    def __init__(self, layers: List[int], num_classes: int = 1000, groups: int = 1, width_per_group: int = 64,
                 base_channels: int = 64):
        super().__init__()
        self.inplanes = base_channels
        self.groups, self.base_width = groups, width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(base_channels, layers[0])
        self.layer2 = self._make_layer(base_channels * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(base_channels * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(base_channels * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(base_channels * 8 * Bottleneck.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes, groups=self.groups, base_width=self.base_width)
                   for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _build(layers, fused: bool, **kwargs) -> nn.Module:
    model = ResNet(layers, **kwargs)
    return convert(model) if fused else model


def resnet50(fused: bool = True, **kwargs) -> nn.Module:
    return _build([3, 4, 6, 3], fused, **kwargs)


def resnet101(fused: bool = True, **kwargs) -> nn.Module:
    return _build([3, 4, 23, 3], fused, **kwargs)


def resnext50_32x4d(fused: bool = True, **kwargs) -> nn.Module:
    return _build([3, 4, 6, 3], fused, groups=32, width_per_group=4, **kwargs)


def resnext101_32x4d(fused: bool = True, **kwargs) -> nn.Module:
    return _build([3, 4, 23, 3], fused, groups=32, width_per_group=4, **kwargs)
