"""The TRADES MNIST network (SmallCNN), optionally with BatchNorm."""

from __future__ import annotations

import torch
from torch import nn


def _conv_block(c_in: int, c_out: int, batch_norm: bool) -> list[nn.Module]:
    layers = [nn.Conv2d(c_in, c_out, 3)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ReLU())
    return layers


class SmallCNN(nn.Module):
    """4 convs + 3 FCs (TRADES). layer3/layer4 are the outputs of the two max-pools.

    On 28x28 those are 32x12x12 and 64x4x4. `batch_norm=True` adds BN after every conv:
    without it, PGD training from scratch sits at chance for hundreds of steps (PAPER.md §7).
    """

    def __init__(
        self, in_channels: int = 3, num_classes: int = 10, batch_norm: bool = True, drop: float = 0.5
    ):
        super().__init__()
        self.block1 = nn.Sequential(
            *_conv_block(in_channels, 32, batch_norm), *_conv_block(32, 32, batch_norm), nn.MaxPool2d(2)
        )
        self.block2 = nn.Sequential(
            *_conv_block(32, 64, batch_norm), *_conv_block(64, 64, batch_norm), nn.MaxPool2d(2)
        )
        # Identity on 28x28 (maps are already 4x4); makes 32x32 inputs fit the first FC.
        self.pool = nn.AdaptiveAvgPool2d((4, 4))
        self.classifier = nn.Sequential(
            nn.Linear(64 * 4 * 4, 200),
            nn.ReLU(),
            nn.Dropout(drop),
            nn.Linear(200, 200),
            nn.ReLU(),
            nn.Linear(200, num_classes),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # TRADES' initialisation: Kaiming-normal convs, zero biases, zero last layer.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.classifier[-1].weight)
        nn.init.zeros_(self.classifier[-1].bias)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """Logits, or `(logits, {"layer3": ..., "layer4": ...})` from the same pass."""
        f3 = self.block1(x)
        f4 = self.block2(f3)
        logits = self.classifier(torch.flatten(self.pool(f4), 1))
        if return_features:
            return logits, {"layer3": f3, "layer4": f4}
        return logits
