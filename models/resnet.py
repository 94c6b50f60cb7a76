"""CIFAR-style ResNets (3x3 stem with padding 1, no max-pool) with a feature interface."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a projection shortcut where shapes differ."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


def _make_layer(block: type, in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
    """``n`` blocks; the first one changes the width and applies the stride."""
    layers = []
    for s in [stride] + [1] * (n - 1):
        layers.append(block(in_planes, planes, s))
        in_planes = planes * block.expansion
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """ResNet for small images; `forward(x, return_features=True)` also gives layer3/layer4."""

    def __init__(self, block: type, num_blocks: list[int], in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.in_planes = 64
        # Padding 1 keeps 32x32 at 32x32 (the release used padding 0, PAPER.md §7).
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], 2)
        # Adaptive pooling lets one network serve 28x28, 32x32 and 64x64 inputs.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block: type, planes: int, n: int, stride: int) -> nn.Sequential:
        layer = _make_layer(block, self.in_planes, planes, n, stride)
        self.in_planes = planes * block.expansion
        return layer

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """Logits, or `(logits, {"layer3": ..., "layer4": ...})` from the same pass."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer2(self.layer1(out))
        f3 = self.layer3(out)
        f4 = self.layer4(f3)
        logits = self.linear(torch.flatten(self.avgpool(f4), 1))
        if return_features:
            return logits, {"layer3": f3, "layer4": f4}
        return logits


def ResNet18(in_channels: int = 3, num_classes: int = 10) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], in_channels, num_classes)


def ResNet34(in_channels: int = 3, num_classes: int = 10) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], in_channels, num_classes)


def ResNet50(in_channels: int = 3, num_classes: int = 10) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], in_channels, num_classes)


class CifarResNet(nn.Module):
    """The 6n+2-layer CIFAR ResNet of He et al. 2016, §4.2 (ResNet-20 for n = 3).

    A 3x3 stem of ``width`` filters, three stages of ``n`` BasicBlocks at widths ``width``,
    ``2 * width`` and ``4 * width`` (16/32/64 in the paper; the second and third stages start
    with stride 2), global average pooling and a linear head. Shortcuts are identities except
    where a stage changes the shape, where they are 1x1 projections with BN (He et al.'s
    option B, the shortcut of the BasicBlock above) rather than option A's zero-padded
    identity: ResNet-20 then has 0.27M parameters, 2.8K more than with option A.

    `forward(x, return_features=True)` gives the last two stages as "layer3" and "layer4",
    the places ResNet-18's layer3/layer4 hold (penultimate and last stage), which the MI
    estimator's internal variants read (PAPER.md §3): 32x14x14 and 64x7x7 on 28x28 inputs,
    32x16x16 and 64x8x8 on 32x32.
    """

    def __init__(self, n: int = 3, width: int = 16, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.stage1 = _make_layer(BasicBlock, width, width, n, 1)
        self.stage2 = _make_layer(BasicBlock, width, 2 * width, n, 2)
        self.stage3 = _make_layer(BasicBlock, 2 * width, 4 * width, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """Logits, or `(logits, {"layer3": ..., "layer4": ...})` from the same pass."""
        out = F.relu(self.bn1(self.conv1(x)))
        f3 = self.stage2(self.stage1(out))
        f4 = self.stage3(f3)
        logits = self.linear(torch.flatten(self.avgpool(f4), 1))
        if return_features:
            return logits, {"layer3": f3, "layer4": f4}
        return logits


def ResNet20(in_channels: int = 3, num_classes: int = 10, width: int = 16) -> CifarResNet:
    return CifarResNet(3, width, in_channels, num_classes)
