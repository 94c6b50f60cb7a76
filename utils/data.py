"""Datasets held in memory as uint8 tensors, and a batch loader that augments on the device.

Every dataset becomes a :class:`Split` of uint8 images (N, C, H, W) and int64 labels (N,).
:class:`BatchLoader` shuffles, shards across ranks, random-crops and flips as batched tensor
ops, and hands out float32 images in [0, 1] (the paper uses no normalisation layer, §7).
"""

from __future__ import annotations

import gzip
import json
import math
import socket
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("cifar10", "cifar100", "svhn", "fashion-mnist", "mnist", "tiny-imagenet", "npy", "synthetic")

# Where `apt-get install dataset-fashion-mnist` puts the idx files.
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_TIMEOUT = 15.0

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
NPY_FILES = ("train_images.npy", "train_labels.npy", "test_images.npy", "test_labels.npy")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


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


# Digits (SVHN, MNIST) are not flipped: a mirrored 2 or 5 is not a digit.
_STATIC_INFO = {
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, 4, True),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, 4, True),
    "svhn": DatasetInfo("svhn", 10, 3, 32, 4, False),
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 1, 28, 4, True),
    "mnist": DatasetInfo("mnist", 10, 1, 28, 4, False),
    "tiny-imagenet": DatasetInfo("tiny-imagenet", 200, 3, 64, 4, True),
}


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


def canonical_name(name: str) -> str:
    """The DATASETS spelling of ``name`` (case and ``_``/``-`` are forgiven)."""
    key = str(name).strip().lower().replace("_", "-")
    aliases = {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist", "tinyimagenet": "tiny-imagenet"}
    key = aliases.get(key, key)
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r} (--dataset); expected one of {', '.join(DATASETS)}")
    return key


def default_crop_padding(image_size: int) -> int:
    """4 px, as PAPER.md §7 for CIFAR-10 and Tiny-ImageNet alike; an eighth of the side for
    images under 28 px (synthetic test data)."""
    return 4 if image_size >= 28 else max(1, round(image_size / 8))


def dataset_info(name: str, data_dir=None) -> DatasetInfo:
    """Classes, shape and augmentation of a dataset.

    ``npy`` reads the shapes and labels from ``data_dir``; ``synthetic`` gives the defaults of
    :func:`load_splits` (the info that ``load_splits`` returns reflects its actual arguments)."""
    name = canonical_name(name)
    if name in _STATIC_INFO:
        return _STATIC_INFO[name]
    if name == "synthetic":
        return _synthetic_info((3, 32, 32), 10)
    root = _existing_dir(data_dir, name)
    return _npy_info(root, *_read_npy(root, mmap=True))


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
        info = _synthetic_info(synthetic_shape, synthetic_classes)
    else:
        root = _existing_dir(data_dir, name)
        if name == "npy":
            arrays = _read_npy(root, mmap=False)
            info = _npy_info(root, *arrays)
            train, test = _npy_splits(*arrays)
        else:
            train, test = _LOADERS[name](root)
            info = _STATIC_INFO[name]
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


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _limit(split: Split, limit: Optional[int], seed: int, flag: str, what: str) -> Split:
    if limit is None:
        return split
    if limit < 1:
        raise DataError(f"{flag} must be positive, got {limit}")
    if limit > len(split):
        raise DataError(f"{flag} {limit} exceeds the {len(split)} {what} samples")
    if limit == len(split):
        return split
    keep = torch.randperm(len(split), generator=_seeded(seed))[:limit].sort().values
    return split.subset(keep)


def _hold_out(train: Split, val_size: int, seed: int) -> Tuple[Split, Split]:
    if val_size < 0:
        raise DataError(f"--val-size must be non-negative, got {val_size}")
    if val_size >= len(train):
        raise DataError(f"--val-size {val_size} must be smaller than the {len(train)} training samples")
    perm = torch.randperm(len(train), generator=_seeded(seed))
    return train.subset(perm[val_size:].sort().values), train.subset(perm[:val_size].sort().values)


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- torchvision datasets


def _torchvision_pair(title: str, root: Path, expected: Sequence, make):
    """``make(train, download)`` -> a dataset; (train, test), downloaded only when the files are missing."""
    try:
        return make(True, False), make(False, False)
    except ImportError as exc:  # SVHN's .mat files need scipy
        raise DataError(f"{title} needs the {exc.name or 'missing'} package: pip install {exc.name or 'scipy'}") \
            from None
    except (RuntimeError, OSError) as exc:
        local = exc
    old = socket.getdefaulttimeout()
    # Without a timeout an offline machine can hang on the connection for minutes.
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        return make(True, True), make(False, True)
    except Exception as exc:
        reason = _short(exc)
        where = " and ".join(str(p) for p in expected)
        if any(Path(p).exists() for p in expected):
            message = (f"{title}: {where} exists but cannot be read, or fails its checksum ({_short(local, 80)}); "
                       f"replace it with a fresh copy (download failed: {reason})")
        else:
            message = f"{title} not found under {root} (expected {where}); download failed: {reason}"
        raise DataError(message) from None
    finally:
        socket.setdefaulttimeout(old)


def _labels(values) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values), dtype=torch.int64)


def _load_cifar(root: Path, hundred: bool) -> Tuple[Split, Split]:
    from torchvision import datasets

    if hundred:
        cls, title, folder = datasets.CIFAR100, "CIFAR-100", "cifar-100-python"
    else:
        cls, title, folder = datasets.CIFAR10, "CIFAR-10", "cifar-10-batches-py"
    pair = _torchvision_pair(title, root, [root / folder], lambda train, dl: cls(str(root), train, download=dl))
    # torchvision keeps CIFAR as one NHWC uint8 array; no per-image conversion needed.
    return tuple(
        Split(torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(), _labels(d.targets)) for d in pair
    )


def _load_svhn(root: Path) -> Tuple[Split, Split]:
    from torchvision import datasets

    pair = _torchvision_pair(
        "SVHN",
        root,
        [root / "train_32x32.mat", root / "test_32x32.mat"],
        lambda train, dl: datasets.SVHN(str(root), "train" if train else "test", download=dl),
    )
    return tuple(Split(torch.from_numpy(np.ascontiguousarray(ds.data)), _labels(ds.labels)) for ds in pair)


def read_idx(path) -> np.ndarray:
    """Read an idx file (the MNIST format; gzip-compressed when the name ends in .gz)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {_short(exc)}") from None
    dtypes = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in dtypes:
        raise DataError(f"{path} is not an idx file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (idx header)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(dtypes[raw[2]])
    count = math.prod(dims)
    if len(raw) - header != count * dtype.itemsize:
        need = count * dtype.itemsize
        raise DataError(f"{path} holds {len(raw) - header} data bytes; its header {dims} needs {need}")
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))  # a native-order, writable copy


def find_idx_dir(dirs: Sequence[Path]) -> Optional[Dict[str, Path]]:
    """The four MNIST-layout idx files (plain or .gz) in the first of ``dirs`` that has them all."""
    for d in dirs:
        found = {}
        for base in IDX_FILES["train"] + IDX_FILES["test"]:
            for candidate in (d / base, d / f"{base}.gz"):
                if candidate.is_file():
                    found[base] = candidate
                    break
        if len(found) == 4:
            return found
    return None


def _idx_split(files: Dict[str, Path], part: str) -> Split:
    image_file, label_file = (files[b] for b in IDX_FILES[part])
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{image_file} {images.shape} and {label_file} {labels.shape} do not match")
    return Split(torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).unsqueeze(1), _labels(labels))


def _load_mnist_like(root: Path, fashion: bool) -> Tuple[Split, Split]:
    # The folder names are torchvision's (its class names), so a torchvision download is found too.
    title, folder = ("Fashion-MNIST", "FashionMNIST") if fashion else ("MNIST", "MNIST")
    raw = root / folder / "raw"
    # The dataset's own folder first: MNIST and Fashion-MNIST files have the same names.
    dirs = [raw, root] + ([DEBIAN_FASHION_DIR] if fashion else [])
    files = find_idx_dir(dirs)
    if files is not None:
        return _idx_split(files, "train"), _idx_split(files, "test")
    expected = f"{raw}/train-images-idx3-ubyte[.gz] etc."
    if fashion:
        expected += f", or {DEBIAN_FASHION_DIR} from apt-get install dataset-fashion-mnist"
    from torchvision import datasets  # slow to import; only needed to download

    cls = getattr(datasets, folder)
    pair = _torchvision_pair(title, root, [expected], lambda train, dl: cls(str(root), train, download=dl))
    return tuple(Split(d.data.to(torch.uint8).unsqueeze(1).contiguous(), _labels(d.targets)) for d in pair)


# ---------------------------------------------------------------- Tiny-ImageNet


def _tiny_root(root: Path) -> Path:
    for candidate in (root / "tiny-imagenet-200", root):
        if (candidate / "wnids.txt").is_file():
            return candidate
    expected = root / "tiny-imagenet-200" / "wnids.txt"
    raise DataError(f"Tiny-ImageNet not found under {root} (expected {expected})")


def _decode_images(paths: List[Path], size: int) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image, read_file

    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs in favour of TorchCodec; they still work.
        warnings.simplefilter("ignore", DeprecationWarning)
        for i, path in enumerate(paths):
            try:
                # RGB mode: a few Tiny-ImageNet images are grayscale.
                image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
            except (RuntimeError, OSError, ValueError) as exc:
                raise DataError(f"cannot decode {path}: {_short(exc)}") from None
            if tuple(image.shape) != (3, size, size):
                raise DataError(f"{path} is {image.shape[-2]}x{image.shape[-1]}; expected {size}x{size}")
            out[i] = image
    return out


def _load_tiny_imagenet(root: Path) -> Tuple[Split, Split]:
    base = _tiny_root(root)
    wnids = sorted({line.strip() for line in (base / "wnids.txt").read_text().splitlines() if line.strip()})
    index = {w: i for i, w in enumerate(wnids)}
    size = _STATIC_INFO["tiny-imagenet"].image_size

    train_paths, train_labels = [], []
    for wnid in wnids:
        folder = base / "train" / wnid / "images"
        if not folder.is_dir():
            raise DataError(f"Tiny-ImageNet class folder {folder} is missing")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        train_paths += files
        train_labels += [index[wnid]] * len(files)
    if not train_paths:
        raise DataError(f"no training images under {base / 'train'}")

    notes = base / "val" / "val_annotations.txt"
    if not notes.is_file():
        raise DataError(f"Tiny-ImageNet validation labels {notes} are missing")
    test_paths, test_labels = [], []
    for n, line in enumerate(notes.read_text().splitlines(), 1):
        fields = line.split("\t")
        if not line.strip():
            continue
        if len(fields) < 2 or fields[1] not in index:
            raise DataError(f"{notes}:{n}: expected '<file>\\t<wnid from wnids.txt>', got {line[:60]!r}")
        test_paths.append(base / "val" / "images" / fields[0])
        test_labels.append(index[fields[1]])

    return (
        Split(_decode_images(train_paths, size), _labels(train_labels)),
        Split(_decode_images(test_paths, size), _labels(test_labels)),
    )


# ---------------------------------------------------------------- the release's .npy files


def _read_npy(root: Path, mmap: bool):
    """Validated (train_images, train_labels, test_images, test_labels), images NHWC."""
    arrays = []
    for filename in NPY_FILES:
        path = root / filename
        if not path.is_file():
            raise DataError(f"missing {path} (the npy dataset needs {', '.join(NPY_FILES)} in {root})")
        try:
            array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read {path}: {_short(exc)}") from None
        arrays.append(array)
    shapes = []
    for part, images, labels in (("train", arrays[0], arrays[1]), ("test", arrays[2], arrays[3])):
        path = root / f"{part}_images.npy"
        if images.dtype != np.uint8:
            raise DataError(f"{path} has dtype {images.dtype}; expected uint8")
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            want = "(N, H, W, C) with C = 1 or 3, or (N, H, W)"
            raise DataError(f"{path} has shape {images.shape}; expected {want}")
        lpath = root / f"{part}_labels.npy"
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if not np.issubdtype(labels.dtype, np.integer) or labels.shape != images.shape[:1]:
            got = f"{labels.dtype} {labels.shape}"
            raise DataError(f"{lpath} is {got}; expected {images.shape[0]} integer labels")
        if len(labels) and labels.min() < 0:
            raise DataError(f"{lpath} has negative labels")
        shapes.append(images.shape[1:])
        arrays[0 if part == "train" else 2], arrays[1 if part == "train" else 3] = images, labels
    if shapes[0] != shapes[1]:
        raise DataError(f"train images are {shapes[0]} but test images are {shapes[1]} (HWC) in {root}")
    if shapes[0][0] != shapes[0][1]:
        side = f"{shapes[0][0]}x{shapes[0][1]}"
        raise DataError(f"images in {root} are {side}; only square images are supported")
    return arrays


NPY_INFO = "info.json"


def _npy_info(root: Path, train_images, train_labels, test_images, test_labels) -> DatasetInfo:
    """Shapes from the arrays; classes, padding and flip from ``info.json`` when make_npy.py wrote
    one (a subset can miss the top class; digits must not be flipped), else guessed."""
    size, channels = train_images.shape[1], train_images.shape[3]
    top = max(int(labels.max()) if len(labels) else 0 for labels in (train_labels, test_labels))
    # The release's npy files are CIFAR-10, which is flipped.
    path = root / NPY_INFO
    try:
        stored = json.loads(path.read_text()) if path.is_file() else {}
        info = DatasetInfo("npy", int(stored.get("num_classes", top + 1)), channels, size,
                           int(stored.get("crop_padding", default_crop_padding(size))), bool(stored.get("flip", True)))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"cannot read {path}: {_short(exc)}") from None
    if info.num_classes <= top:
        raise DataError(f"{path} says {info.num_classes} classes, but the labels go up to {top}")
    return info


def _npy_splits(train_images, train_labels, test_images, test_labels) -> Tuple[Split, Split]:
    return tuple(
        Split(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), _labels(y).reshape(-1))
        for x, y in ((train_images, train_labels), (test_images, test_labels))
    )


# ---------------------------------------------------------------- synthetic data


def _synthetic_info(shape, classes: int) -> DatasetInfo:
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
    g = _seeded(seed)
    coarse = torch.rand((classes, channels, min(4, height), min(4, width)), generator=g) * 255
    coarse = (coarse + coarse.flip(-1)) / 2
    templates = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)

    def draw(n: int) -> Split:
        labels = (torch.arange(n) % classes)[torch.randperm(n, generator=g)]
        noise = torch.randn((n, channels, height, width), generator=g) * 32
        images = (templates[labels] + noise).round_().clamp_(0, 255).to(torch.uint8)
        return Split(images, labels)

    return draw(int(sizes[0])), draw(int(sizes[1]))


_LOADERS = {
    "cifar10": lambda root: _load_cifar(root, hundred=False),
    "cifar100": lambda root: _load_cifar(root, hundred=True),
    "svhn": _load_svhn,
    "mnist": lambda root: _load_mnist_like(root, fashion=False),
    "fashion-mnist": lambda root: _load_mnist_like(root, fashion=True),
    "tiny-imagenet": _load_tiny_imagenet,
}


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
    """Batches of a :class:`Split` as (float32 images in [0, 1], int64 labels) on ``device``.

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
            yield x.float().div_(255), y
