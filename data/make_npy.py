"""Write the release's data files from any dataset that utils/data/loaders.py can load.

    python data/make_npy.py --dataset cifar10 --data-dir data --out data

writes ``{train,test}_{images,labels}.npy`` to ``--out``: uint8 NHWC images (C = 1 for
grayscale) and int64 labels. ``--dataset npy --data-dir <out>`` then reads them back.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

# The script lives in data/, outside any package; make the repository's utils importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.data.files import NPY_INFO  # noqa: E402
from utils.data.loaders import DATASETS, load_splits  # noqa: E402
from utils.data.splits import DataError, DatasetInfo, Split  # noqa: E402
from utils.training.checkpoint import atomic_write_text  # noqa: E402


def split_arrays(split: Split):
    """(uint8 NHWC images, int64 labels) as numpy arrays."""
    images = split.images.cpu().permute(0, 2, 3, 1).contiguous().numpy()
    return images, split.labels.cpu().numpy().astype(np.int64)


def write_npy(splits: Dict[str, Split], out_dir, info: Optional[DatasetInfo] = None) -> List[Path]:
    """Save the train and test splits as the release's four .npy files; returns their paths.

    With ``info``, also info.json: the source dataset's class count, crop padding and flip,
    which the arrays alone cannot tell (``--dataset npy`` reads it back)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if info is not None:
        settings = {"source": info.name, "num_classes": info.num_classes, "crop_padding": info.crop_padding,
                    "flip": info.flip}
        atomic_write_text(out / NPY_INFO, json.dumps(settings, indent=2) + "\n")
    for part in ("train", "test"):
        for kind, array in zip(("images", "labels"), split_arrays(splits[part])):
            path = out / f"{part}_{kind}.npy"
            tmp = path.with_name(f".{path.name}.tmp")
            # Write then rename, so an interrupted run never leaves a truncated file behind.
            with open(tmp, "wb") as f:
                np.save(f, array)
            os.replace(tmp, path)
            written.append(path)
    return written


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: Optional[List[str]] = None) -> int:
    parser = _Parser(prog="make_npy.py", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help=f"one of {', '.join(DATASETS)}")
    parser.add_argument("--data-dir", "--data_dir", default="data", help="where the source dataset lives")
    parser.add_argument("--out", default="data", help="folder for the four .npy files")
    parser.add_argument("--train-limit", type=int, default=None, help="keep a seeded train subset")
    parser.add_argument("--test-limit", type=int, default=None, help="keep a seeded test subset")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subsets (and of synthetic data)")
    parser.add_argument("--synthetic-size", type=int, nargs=2, default=(512, 256), metavar=("TRAIN", "TEST"),
                        help="image counts of --dataset synthetic (50000 10000: CIFAR-10's sizes, for timing)")
    args = parser.parse_args(argv)
    try:
        limits = {"train_limit": args.train_limit, "test_limit": args.test_limit}
        splits, info = load_splits(args.dataset, args.data_dir, seed=args.seed, synthetic_size=args.synthetic_size,
                                   **limits)
        paths = write_npy(splits, args.out, info)
    except (DataError, OSError, ValueError) as exc:
        message = " ".join(str(exc).split())
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2
    shape = f"{info.image_size}x{info.image_size}x{info.in_channels}"
    print(
        f"{info.name}: {len(splits['train'])} train / {len(splits['test'])} test images, {shape}, "
        f"{info.num_classes} classes -> {paths[0].parent}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
