"""MI estimator networks: local net C, global net T and the pair E = (C, T) (PAPER.md §3)."""
from typing import Optional, Sequence

import torch
import torch.nn as nn

from utils.mi.bounds import mi_per_sample
from utils.mi.release_compat import NONE, Quirks

INTERNAL_LAYERS = ("layer3", "layer4")


class ResidualBlock1x1(nn.Module):
    """1×1 residual block that ends both nets: LayerNorm_channels(nonlinear(x) + shortcut(x)) (§3)."""

    def __init__(self, in_ch: int, hidden: int):
        super().__init__()
        self.nonlinear = nn.Sequential(
            nn.Conv2d(in_ch, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 1, bias=True),
        )
        self.shortcut = nn.Conv2d(in_ch, hidden, 1, bias=False)
        self.norm = nn.LayerNorm(hidden)
        # Near-identity shortcut so the block starts as (almost) a pass-through of its input.
        # No identity exists when in_ch > hidden (never with H = 2048): PAPER.md §3 and DIM then
        # keep PyTorch's default initialisation.
        if in_ch <= hidden:
            with torch.no_grad():
                self.shortcut.weight.uniform_(-0.01, 0.01)
                idx = torch.arange(in_ch)
                self.shortcut.weight[idx, idx, 0, 0] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.nonlinear(x) + self.shortcut(x)
        return self.norm(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _down(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class LocalEncoder(nn.Module):
    """Local net C (the release's ``Estimator``): image-shaped pattern -> (N, H, h/4, w/4) map (§3).

    The input is detached: the estimators never send gradient into the image or the noise."""

    def __init__(self, in_channels: int, hidden: int = 2048):
        super().__init__()
        self.features = nn.Sequential(_down(in_channels, 64), _down(64, 128))
        self.block = ResidualBlock1x1(128, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.features(x.detach()))


class GlobalEncoder(nn.Module):
    """Global net T (the release's ``MI1x1ConvNet``): target output -> (N, H, 1, 1) (§3).

    Default input: logits (N, C), seen as C×1×1. With ``internal`` ("layer3"/"layer4", the
    release's ``--is-internal`` / ``--is-internal-last``) the input is a (N, C, h, w) feature
    map of shape ``feature_shape``: 4×4 stride-2 convs halve it while both sides are ≥ 2
    (odd sides are floored, e.g. 7→3→1), and an adaptive average pool then brings any
    remainder (a non-square map, say) to 1×1; it is the identity when the convs reach 1×1.
    Gradients flow into the input: stage 3 trains the target model through this net."""

    def __init__(
        self,
        in_features: int,
        hidden: int = 2048,
        internal: Optional[str] = None,
        feature_shape: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        self.internal = internal
        layers = []
        if internal is not None:
            if internal not in INTERNAL_LAYERS:
                raise ValueError(f"internal must be one of {INTERNAL_LAYERS} or None, got {internal!r}")
            if feature_shape is None or len(feature_shape) != 3:
                raise ValueError("an internal global net needs feature_shape=(C, h, w)")
            c, h, w = (int(s) for s in feature_shape)
            if c != in_features:
                raise ValueError(f"in_features={in_features} but feature_shape has {c} channels")
            while h >= 2 and w >= 2:
                layers.append(_down(c, c))
                h, w = (h - 2) // 2 + 1, (w - 2) // 2 + 1
            layers.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        self.block = ResidualBlock1x1(in_features, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x[:, :, None, None]
        return self.block(self.features(x))


class MIEstimator(nn.Module):
    """One estimator E = (local net C, global net T); E_n takes x, E_a takes n = x̃ − x (§3)."""

    def __init__(self, local: LocalEncoder, global_: GlobalEncoder):
        super().__init__()
        self.local = local
        self.global_ = global_

    def mi(self, pattern: torch.Tensor, global_input: torch.Tensor, mode: str = "dv",
           estimate: bool = False, quirks: Quirks = NONE) -> torch.Tensor:
        """Per-sample Î(pattern, h(v)), shape (N,); ``global_input`` is h(v) (logits or features).

        ``estimate``: report an MI value rather than the training objective; ``quirks``: the
        release's bounds (both as in ``mi_per_sample``)."""
        return mi_per_sample(self.local(pattern), self.global_(global_input), mode, estimate, quirks)

    forward = mi


def build_estimator(
    in_channels: int,
    num_classes: int,
    hidden: int = 2048,
    internal: Optional[str] = None,
    feature_shape: Optional[Sequence[int]] = None,
) -> MIEstimator:
    """E for images of ``in_channels`` channels and a target with ``num_classes`` logits.

    With ``internal`` the global net reads that layer's features (``feature_shape``) instead."""
    in_features = num_classes
    if internal is not None and feature_shape is not None:
        in_features = int(feature_shape[0])
    return MIEstimator(
        LocalEncoder(in_channels, hidden),
        GlobalEncoder(in_features, hidden, internal=internal, feature_shape=feature_shape),
    )
