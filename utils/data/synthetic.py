"""Synthetic test data: seeded class-conditional images that need no files on disk."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.data.splits import DataError, DatasetInfo, Split, default_crop_padding, seeded


def synthetic_info(shape, classes: int) -> DatasetInfo:
    channels, height, width = (int(s) for s in shape)
    if height != width:
        raise DataError(f"synthetic images must be square, got {height}x{width}")
    return DatasetInfo("synthetic", int(classes), channels, height, default_crop_padding(height), True)


def make_synthetic(sizes=(512, 256), shape=(3, 32, 32), classes: int = 10, seed: int = 0):
    """Seeded class-conditional images: a smooth per-class template plus pixel noise.

    Templates are coarse (blocks of ~1/4 the side) and left-right symmetric, so the random
    crops and flips of training augmentation keep a sample recognisable."""
    if len(shape) != 3 or min(shape) < 1:
        raise DataError(f"synthetic shape must be (C, H, W) with positive sides, got {tuple(shape)}")
    if classes < 2:
        raise DataError(f"synthetic data needs at least 2 classes, got {classes}")
    if len(sizes) != 2 or min(sizes) < 1:
        raise DataError(f"synthetic sizes must be two positive counts (train, test), got {tuple(sizes)}")
    channels, height, width = (int(s) for s in shape)
    g = seeded(seed)
    # float32 whatever the default dtype: the same seed gives the same images in a float64 run
    coarse = torch.rand((classes, channels, min(4, height), min(4, width)), generator=g, dtype=torch.float32) * 255
    coarse = (coarse + coarse.flip(-1)) / 2
    templates = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)

    def draw(n: int) -> Split:
        labels = (torch.arange(n) % classes)[torch.randperm(n, generator=g)]
        noise = torch.randn((n, channels, height, width), generator=g, dtype=torch.float32) * 32
        images = (templates[labels] + noise).round_().clamp_(0, 255).to(torch.uint8)
        return Split(images, labels)

    return draw(int(sizes[0])), draw(int(sizes[1]))
