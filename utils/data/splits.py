"""The in-memory form of every dataset: a :class:`Split` of uint8 images and int64 labels,
the :class:`DatasetInfo` that says how to augment it, and :class:`DataError` for a dataset
that cannot be found or read."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class DataError(Exception):
    """A dataset cannot be found or read; the message is one line naming the path or flag."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    in_channels: int
    image_size: int
    crop_padding: int
    flip: bool


@dataclass(eq=False)  # tensors have no single truth value to compare by
class Split:
    """One split held in memory: uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            got = f"{self.images.dtype} {tuple(self.images.shape)}"
            raise ValueError(f"images must be uint8 (N, C, H, W), got {got}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be int64 of shape ({self.images.shape[0]},), "
                f"got {self.labels.dtype} {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))

    def subset(self, index: torch.Tensor) -> Split:
        index = index.to(self.images.device)
        return Split(self.images[index], self.labels[index])


def default_crop_padding(image_size: int) -> int:
    """4 px, as PAPER.md §7 for CIFAR-10 and Tiny-ImageNet alike; an eighth of the side for
    images under 28 px (synthetic test data)."""
    return 4 if image_size >= 28 else max(1, round(image_size / 8))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))
