"""Datasets held in memory as uint8 tensors, and a batch loader that augments on the device.

Every dataset becomes a :class:`Split` of uint8 images (N, C, H, W) and int64 labels (N,),
read by :mod:`utils.data.files` or drawn by :mod:`utils.data.synthetic`; :func:`load_splits`
keeps seeded subsets and holds out a validation split. :class:`BatchLoader` shuffles, shards
across ranks, random-crops and flips as batched tensor ops, and hands out float32 images in
[0, 1] (the paper uses no normalisation layer, §7)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

from utils.data.files import LOADERS, STATIC_INFO, npy_info, npy_splits, read_npy
from utils.data.splits import DataError, DatasetInfo, Split, seeded
from utils.data.synthetic import make_synthetic, synthetic_info

DATASETS = ("cifar10", "cifar100", "svhn", "fashion-mnist", "mnist", "tiny-imagenet", "npy", "synthetic")


def canonical_name(name: str) -> str:
    """The DATASETS spelling of ``name`` (case and ``_``/``-`` are forgiven)."""
    key = str(name).strip().lower().replace("_", "-")
    aliases = {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist", "tinyimagenet": "tiny-imagenet"}
    key = aliases.get(key, key)
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r} (--dataset); expected one of {', '.join(DATASETS)}")
    return key


def dataset_info(name: str, data_dir=None) -> DatasetInfo:
    """Classes, shape and augmentation of a dataset.

    ``npy`` reads the shapes and labels from ``data_dir``; ``synthetic`` gives the defaults of
    :func:`load_splits` (the info that ``load_splits`` returns reflects its actual arguments)."""
    name = canonical_name(name)
    if name in STATIC_INFO:
        return STATIC_INFO[name]
    if name == "synthetic":
        return synthetic_info((3, 32, 32), 10)
    root = _existing_dir(data_dir, name)
    return npy_info(root, *read_npy(root, mmap=True))


def load_splits(
    name: str,
    data_dir,
    *,
    train_limit: Optional[int] = None,
    test_limit: Optional[int] = None,
    val_size: Optional[int] = 0,
    seed: int = 0,
    synthetic_size: Tuple[int, int] = (512, 256),
    synthetic_shape: Tuple[int, int, int] = (3, 32, 32),
    synthetic_classes: int = 10,
) -> Tuple[Dict[str, Optional[Split]], DatasetInfo]:
    """Load a dataset into memory: ``({"train", "val", "test"}, info)``; ``val`` is None without val_size.

    Limits keep a seeded random subset (in the original order); the validation split is a
    seeded hold-out from the (limited) training split, disjoint from what stays in train."""
    name = canonical_name(name)
    if name == "synthetic":
        train, test = make_synthetic(synthetic_size, synthetic_shape, synthetic_classes, seed)
        info = synthetic_info(synthetic_shape, synthetic_classes)
    else:
        root = _existing_dir(data_dir, name)
        if name == "npy":
            arrays = read_npy(root, mmap=False)
            info = npy_info(root, *arrays)
            train, test = npy_splits(*arrays)
        else:
            train, test = LOADERS[name](root)
            info = STATIC_INFO[name]
    # Separate streams, so that changing one limit does not reshuffle the other split.
    train = _limit(train, train_limit, seed, "--train-limit", "training")
    test = _limit(test, test_limit, seed + 1, "--test-limit", "test")
    val = None
    if val_size is None:
        val_size = default_val_size(len(train))
    if val_size:
        train, val = _hold_out(train, val_size, seed + 2)
    return {"train": train, "val": val, "test": test}, info


def default_val_size(n_train: int) -> int:
    """Held-out images for model selection when --val-size is not given: 1,000 (the usual
    CIFAR-10 hold-out), or a tenth of a training split under 10,000 images, and at least one."""
    return max(1, min(1000, n_train // 10))


def _existing_dir(data_dir, name: str) -> Path:
    if data_dir is None or str(data_dir) == "":
        raise DataError(f"--data-dir is required for dataset {name}")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist (--data-dir)")
    return root


def _limit(split: Split, limit: Optional[int], seed: int, flag: str, what: str) -> Split:
    if limit is None:
        return split
    if limit < 1:
        raise DataError(f"{flag} must be positive, got {limit}")
    if limit > len(split):
        raise DataError(f"{flag} {limit} exceeds the {len(split)} {what} samples")
    if limit == len(split):
        return split
    keep = torch.randperm(len(split), generator=seeded(seed))[:limit].sort().values
    return split.subset(keep)


def _hold_out(train: Split, val_size: int, seed: int) -> Tuple[Split, Split]:
    if val_size < 0:
        raise DataError(f"--val-size must be non-negative, got {val_size}")
    if val_size >= len(train):
        raise DataError(f"--val-size {val_size} must be smaller than the {len(train)} training samples")
    perm = torch.randperm(len(train), generator=seeded(seed))
    return train.subset(perm[val_size:].sort().values), train.subset(perm[:val_size].sort().values)


# ---------------------------------------------------------------- batching and augmentation


def crop_flip(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, padding: int):
    """Crop each image at (top, left) of its zero-padded copy, mirrored where ``flip``; one gather.

    ``top``/``left`` lie in [0, 2 * padding]; top = left = padding and no flip is the identity."""
    n, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding,) * 4) if padding else images
    rows = top.to(device)[:, None] + torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    cols = torch.where(flip.to(device)[:, None], w - 1 - cols, cols) + left.to(device)[:, None]
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


class BatchLoader:
    """Batches of a :class:`Split` as (images in [0, 1] in the default dtype (float32), int64 labels) on ``device``.

    Each pass draws its permutation and augmentation from ``generator`` (a fixed amount per
    pass, whatever the rank), so restoring the generator's state replays an epoch. Ranks must
    share the generator's seed: each takes every ``world_size``-th index of the same
    permutation, padded by wrapping around (or truncated with ``drop_last``) so that all
    ranks see the same number of batches."""

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool = False,
        info: Optional[DatasetInfo] = None,
        device="cpu",
        generator: Optional[torch.Generator] = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if augment and info is None:
            raise ValueError("augment=True needs the DatasetInfo (crop padding, flip)")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.info = info
        self.device = torch.device(device)
        self.generator = generator
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        n = len(split)
        self.samples_per_rank = n // world_size if drop_last else -(-n // world_size)
        per_rank = self.samples_per_rank
        self._batches = per_rank // batch_size if drop_last else -(-per_rank // batch_size)

    def __len__(self) -> int:
        return self._batches

    def _randint(self, high: int, size: int) -> torch.Tensor:
        device = self.generator.device if self.generator is not None else "cpu"
        return torch.randint(high, (size,), generator=self.generator, device=device)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.split)
        total = self.samples_per_rank * self.world_size
        if self.shuffle:
            device = self.generator.device if self.generator is not None else "cpu"
            order = torch.randperm(n, generator=self.generator, device=device).cpu()
        else:
            order = torch.arange(n)
        if total > n:
            order = order.repeat(-(-total // n))
        order = order[:total]
        if self.augment:
            # Drawn for every position of every rank, so ranks advance the generator alike.
            pad = self.info.crop_padding
            top, left = self._randint(2 * pad + 1, total).cpu(), self._randint(2 * pad + 1, total).cpu()
            flip = torch.zeros(total, dtype=torch.bool)
            if self.info.flip:
                flip = self._randint(2, total).cpu().bool()
        mine = slice(self.rank, total, self.world_size)
        order = order[mine].to(self.split.images.device)
        if self.augment:
            top, left, flip = (t[mine].to(self.device) for t in (top, left, flip))
        for b in range(self._batches):
            part = slice(b * self.batch_size, (b + 1) * self.batch_size)
            index = order[part]
            x = self.split.images[index].to(self.device, non_blocking=True)
            y = self.split.labels[index].to(self.device, non_blocking=True)
            if self.augment:
                x = crop_flip(x, top[part], left[part], flip[part], self.info.crop_padding)
            yield x.to(torch.get_default_dtype()).div_(255), y
