"""Target architectures, looked up by name, all sharing `forward(x, return_features=False)`.

With `return_features=True` every model returns `(logits, {"layer3": ..., "layer4": ...})`
from a single forward pass; these feed the MI estimator's internal variants (PAPER.md §3).
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch import nn

from utils.attacks.base import eval_mode

from .resnet import CifarResNet, ResNet, ResNet18, ResNet20, ResNet34, ResNet50
from .smallcnn import SmallCNN
from .vgg import VGG, VGG19
from .wideresnet import WideResNet, WideResNet34_10

_FACTORIES: Dict[str, Callable[[int, int], nn.Module]] = {
    "resnet18": lambda c, k: ResNet18(in_channels=c, num_classes=k),
    "resnet34": lambda c, k: ResNet34(in_channels=c, num_classes=k),
    "resnet50": lambda c, k: ResNet50(in_channels=c, num_classes=k),
    "resnet20": lambda c, k: ResNet20(in_channels=c, num_classes=k),
    "wrn-34-10": lambda c, k: WideResNet34_10(in_channels=c, num_classes=k),
    "vgg19": lambda c, k: VGG19(in_channels=c, num_classes=k),
    "smallcnn": lambda c, k: SmallCNN(in_channels=c, num_classes=k, batch_norm=True),
    "smallcnn-nobn": lambda c, k: SmallCNN(in_channels=c, num_classes=k, batch_norm=False),
}

MODEL_NAMES = ("resnet18", "resnet34", "resnet50", "resnet20", "wrn-34-10", "vgg19", "smallcnn", "smallcnn-nobn")


def get_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Build the architecture `name` (one of MODEL_NAMES)."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(MODEL_NAMES)}")
    return _FACTORIES[name](in_channels, num_classes)


def feature_shapes(model: nn.Module, input_shape: Tuple[int, ...]) -> Dict[str, Tuple[int, ...]]:
    """Per-sample shapes of layer3, layer4 and logits for inputs of shape (C, H, W).

    Runs one dummy batch in eval mode (so BN statistics are untouched) and then restores
    each module's own train/eval flag, since callers may have frozen parts of the model.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    with eval_mode(model), torch.no_grad():
        logits, feats = model(torch.zeros(2, *input_shape, device=device), return_features=True)
    shapes = {k: tuple(v.shape[1:]) for k, v in feats.items()}
    shapes["logits"] = tuple(logits.shape[1:])
    return shapes


__all__ = [
    "MODEL_NAMES",
    "CifarResNet",
    "ResNet",
    "SmallCNN",
    "VGG",
    "WideResNet",
    "feature_shapes",
    "get_model",
]
