"""CIFAR-style VGG-19 with BatchNorm and a feature interface."""

from __future__ import annotations

import torch
from torch import nn

# Conv widths per stage; a 2x2 max-pool follows each stage.
VGG19_STAGES = ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512))


class VGG(nn.Module):
    """VGG with BN; layer3/layer4 are the outputs of conv stages 4 and 5 (before their pools).

    On 32x32 that is 512x4x4 and 512x2x2, matching ResNet-18's layer4 resolution for layer3.
    """

    def __init__(self, stages=VGG19_STAGES, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        blocks = []
        c = in_channels
        for widths in stages:
            layers = []
            for w in widths:
                layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c = w
            blocks.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(blocks)
        # ceil_mode keeps odd maps alive: 28x28 goes 28-14-7-4-2-1 instead of collapsing to 0x0.
        self.pools = nn.ModuleList(nn.MaxPool2d(2, ceil_mode=True) for _ in stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """Logits, or `(logits, {"layer3": ..., "layer4": ...})` from the same pass."""
        outs = []
        out = x
        for stage, pool in zip(self.stages, self.pools):
            out = stage(out)
            outs.append(out)
            out = pool(out)
        logits = self.classifier(torch.flatten(self.avgpool(out), 1))
        if return_features:
            return logits, {"layer3": outs[3], "layer4": outs[4]}
        return logits


def VGG19(in_channels: int = 3, num_classes: int = 10) -> VGG:
    return VGG(VGG19_STAGES, in_channels, num_classes)
