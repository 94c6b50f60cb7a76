"""WideResNet-34-10 as used by TRADES and MART (pre-activation blocks)."""

from __future__ import annotations

import torch
from torch import nn


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv-BN-ReLU-dropout-conv plus shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(drop_rate)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes and stride == 1
        # When shapes change, the projection takes the pre-activated input, as in TRADES.
        self.shortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        # relu1 is in-place on BN's fresh output, so `x` is intact for the identity path.
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WideResNet-depth-widen; `forward(x, return_features=True)` also gives layer3/layer4.

    layer3 is the output of block2; layer4 the final BN-ReLU after block3
    (on 32x32 with widen 10: 320x16x16 and 640x8x8).
    """

    def __init__(
        self,
        depth: int = 34,
        widen_factor: int = 10,
        in_channels: int = 3,
        num_classes: int = 10,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = self._group(widths[0], widths[1], n, 1, drop_rate)
        self.block2 = self._group(widths[1], widths[2], n, 2, drop_rate)
        self.block3 = self._group(widths[2], widths[3], n, 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        # Adaptive (instead of a fixed 8x8) pool so 28x28 and 64x64 inputs work as well.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        self._init_weights()

    @staticmethod
    def _group(in_planes: int, out_planes: int, n: int, stride: int, drop_rate: float) -> nn.Sequential:
        blocks = [WideBasicBlock(in_planes, out_planes, stride, drop_rate)]
        blocks += [WideBasicBlock(out_planes, out_planes, 1, drop_rate) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """Logits, or `(logits, {"layer3": ..., "layer4": ...})` from the same pass."""
        out = self.block1(self.conv1(x))
        f3 = self.block2(out)
        f4 = self.relu(self.bn1(self.block3(f3)))
        logits = self.fc(torch.flatten(self.avgpool(f4), 1))
        if return_features:
            return logits, {"layer3": f3, "layer4": f4}
        return logits


def WideResNet34_10(in_channels: int = 3, num_classes: int = 10, drop_rate: float = 0.0) -> WideResNet:
    return WideResNet(34, 10, in_channels, num_classes, drop_rate)

