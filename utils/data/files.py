"""The datasets read from disk: CIFAR-10/100 pickles and SVHN .mat files (through torchvision),
idx files for MNIST and Fashion-MNIST (also where Debian installs Fashion-MNIST), Tiny-ImageNet
folders and the release's .npy files, each read into a pair of :class:`Split` (train, test).
"""

from __future__ import annotations

import gzip
import json
import math
import socket
import struct
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from utils.data.splits import DataError, DatasetInfo, Split, default_crop_padding

# Where `apt-get install dataset-fashion-mnist` puts the idx files.
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_TIMEOUT = 15.0

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
NPY_FILES = ("train_images.npy", "train_labels.npy", "test_images.npy", "test_labels.npy")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


# Digits (SVHN, MNIST) are not flipped: a mirrored 2 or 5 is not a digit.
STATIC_INFO = {
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, 4, True),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, 4, True),
    "svhn": DatasetInfo("svhn", 10, 3, 32, 4, False),
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 1, 28, 4, True),
    "mnist": DatasetInfo("mnist", 10, 1, 28, 4, False),
    "tiny-imagenet": DatasetInfo("tiny-imagenet", 200, 3, 64, 4, True),
}


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
    size = STATIC_INFO["tiny-imagenet"].image_size

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


def read_npy(root: Path, mmap: bool):
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


def npy_info(root: Path, train_images, train_labels, test_images, test_labels) -> DatasetInfo:
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


def npy_splits(train_images, train_labels, test_images, test_labels) -> Tuple[Split, Split]:
    return tuple(
        Split(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), _labels(y).reshape(-1))
        for x, y in ((train_images, train_labels), (test_images, test_labels))
    )


# Each file-backed dataset's reader: data directory -> (train, test).
LOADERS = {
    "cifar10": lambda root: _load_cifar(root, hundred=False),
    "cifar100": lambda root: _load_cifar(root, hundred=True),
    "svhn": _load_svhn,
    "mnist": lambda root: _load_mnist_like(root, fashion=False),
    "fashion-mnist": lambda root: _load_mnist_like(root, fashion=True),
    "tiny-imagenet": _load_tiny_imagenet,
}
