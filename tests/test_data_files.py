"""utils/data/files.py and data/make_npy.py: the release's .npy files, idx files and
(Fashion-)MNIST, CIFAR and SVHN through torchvision, Tiny-ImageNet folders."""

import gzip
import importlib.util
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import FASHION_DIR, HAVE_FASHION
from tests.test_data_loaders import synthetic
from utils.data import files
from utils.data.files import read_idx
from utils.data.loaders import dataset_info, load_splits
from utils.data.splits import DataError, DatasetInfo

ROOT = Path(__file__).resolve().parents[1]


def _load_make_npy():
    spec = importlib.util.spec_from_file_location("make_npy", ROOT / "data" / "make_npy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_npy = _load_make_npy()


# ---------------------------------------------------------------- the release's .npy files


def test_npy_round_trip(tmp_path):
    splits, _ = synthetic()
    written = make_npy.write_npy(splits, tmp_path)
    assert sorted(p.name for p in written) == sorted(files.NPY_FILES)
    images = np.load(tmp_path / "train_images.npy")
    assert images.dtype == np.uint8 and images.shape == (60, 16, 16, 3)  # NHWC
    assert np.load(tmp_path / "train_labels.npy").dtype == np.int64
    loaded, info = load_splits("npy", tmp_path)
    assert info == DatasetInfo("npy", 4, 3, 16, 2, True) == dataset_info("npy", tmp_path)
    for part in ("train", "test"):
        assert torch.equal(loaded[part].images, splits[part].images)
        assert torch.equal(loaded[part].labels, splits[part].labels)


def test_npy_keeps_the_source_settings_in_info_json(tmp_path):
    """A digits subset: no flips, and 10 classes even if the top one is not in the subset."""
    splits, _ = synthetic()  # labels 0..3
    digits = DatasetInfo("mnist", 10, 3, 16, 4, False)
    make_npy.write_npy(splits, tmp_path, digits)
    _, info = load_splits("npy", tmp_path)
    assert (info.num_classes, info.crop_padding, info.flip) == (10, 4, False) and info == dataset_info("npy", tmp_path)
    (tmp_path / files.NPY_INFO).write_text('{"num_classes": 2}')  # fewer than the labels need
    with pytest.raises(DataError, match="labels go up to 3"):
        load_splits("npy", tmp_path)


def test_npy_accepts_grayscale_nhw(tmp_path):
    rng = np.random.default_rng(0)
    for part, n in (("train", 8), ("test", 4)):
        np.save(tmp_path / f"{part}_images.npy", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        np.save(tmp_path / f"{part}_labels.npy", np.arange(n, dtype=np.uint8) % 3)
    splits, info = load_splits("npy", tmp_path)
    assert splits["train"].images.shape == (8, 1, 28, 28) and splits["train"].labels.dtype == torch.int64
    assert (info.in_channels, info.image_size, info.num_classes, info.crop_padding) == (1, 28, 3, 4)


def test_npy_errors_name_the_file(tmp_path):
    splits, _ = synthetic()
    make_npy.write_npy(splits, tmp_path)
    (tmp_path / "test_labels.npy").unlink()
    with pytest.raises(DataError, match=str(tmp_path / "test_labels.npy")):
        load_splits("npy", tmp_path)
    np.save(tmp_path / "test_labels.npy", np.zeros(30, dtype=np.int64))
    np.save(tmp_path / "train_images.npy", np.zeros((60, 16, 16, 3), dtype=np.float32))
    with pytest.raises(DataError, match="train_images.npy has dtype float32"):
        load_splits("npy", tmp_path)
    np.save(tmp_path / "train_images.npy", np.zeros((60, 3, 16, 16), dtype=np.uint8))  # NCHW by mistake
    with pytest.raises(DataError, match="train_images.npy has shape"):
        load_splits("npy", tmp_path)


def test_make_npy_cli(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert make_npy.main(["--dataset", "synthetic", "--out", out, "--train-limit", "100"]) == 0
    assert np.load(tmp_path / "out" / "train_images.npy").shape == (100, 32, 32, 3)
    assert make_npy.main(["--dataset", "synthetic", "--out", out, "--synthetic-size", "70", "30"]) == 0
    assert len(np.load(tmp_path / "out" / "train_labels.npy")) == 70
    assert len(np.load(tmp_path / "out" / "test_labels.npy")) == 30
    assert make_npy.main(["--dataset", "synthetic", "--out", out, "--synthetic-size", "0", "30"]) == 2
    capsys.readouterr()
    assert make_npy.main(["--dataset", "npy", "--data-dir", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing" in err
    with pytest.raises(SystemExit) as exc:
        make_npy.main(["--dataset", "synthetic", "--bogus"])
    assert exc.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_make_npy_script_fails_without_traceback(tmp_path):
    script = str(ROOT / "data" / "make_npy.py")
    result = subprocess.run(
        [sys.executable, script, "--dataset", "cifar10", "--data-dir", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--data-dir" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- idx files and (Fashion-)MNIST


def _write_idx(path, array: np.ndarray, code: int):
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if path.suffix == ".gz":
        payload = gzip.compress(payload)
    path.write_bytes(payload)


def test_read_idx(tmp_path):
    images = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a-idx3-ubyte", images, 0x08)
    assert np.array_equal(read_idx(tmp_path / "a-idx3-ubyte"), images)
    big = np.array([1, -2, 70000], dtype=np.int32)
    _write_idx(tmp_path / "b-idx1-ubyte.gz", big, 0x0C)
    out = read_idx(tmp_path / "b-idx1-ubyte.gz")
    assert np.array_equal(out, big) and out.dtype.isnative
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(DataError, match="not an idx file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes((tmp_path / "a-idx3-ubyte").read_bytes()[:-1])
    with pytest.raises(DataError, match="short"):
        read_idx(tmp_path / "short")


def _fake_mnist(folder: Path, gz: bool):
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for part, n in (("train", 6), ("t10k", 4)):
        images = np.full((n, 28, 28), 7, dtype=np.uint8)
        _write_idx(folder / f"{part}-images-idx3-ubyte{suffix}", images, 0x08)
        _write_idx(folder / f"{part}-labels-idx1-ubyte{suffix}", np.arange(n, dtype=np.uint8), 0x08)


def test_mnist_from_idx_files_in_data_dir(tmp_path):
    _fake_mnist(tmp_path, gz=False)
    splits, info = load_splits("mnist", tmp_path)
    assert splits["train"].images.shape == (6, 1, 28, 28) and len(splits["test"]) == 4
    assert splits["train"].labels.tolist() == list(range(6)) and info.name == "mnist"


def test_fashion_from_torchvision_raw_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "DEBIAN_FASHION_DIR", tmp_path / "nowhere")
    _fake_mnist(tmp_path / "FashionMNIST" / "raw", gz=True)
    splits, _ = load_splits("fashion-mnist", tmp_path)
    assert len(splits["train"]) == 6 and int(splits["test"].images.max()) == 7


@pytest.mark.skipif(not HAVE_FASHION, reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist(tmp_path):
    for data_dir in (tmp_path, FASHION_DIR):  # an empty dir falls back to the Debian files
        splits, info = load_splits("fashion-mnist", data_dir)
        train, test = splits["train"], splits["test"]
        assert (len(train), len(test)) == (60000, 10000)
        assert train.images.shape[1:] == (1, 28, 28) and train.images.dtype == torch.uint8
        assert info.num_classes == 10 and info.in_channels == 1
        assert torch.equal(torch.bincount(train.labels), torch.full((10,), 6000))
        assert int(train.images.max()) == 255


def _fail_download(*args, **kwargs):
    raise OSError("offline in tests")


@pytest.mark.parametrize(
    "name, cls, expected",
    [
        ("cifar10", "CIFAR10", "cifar-10-batches-py"),
        ("mnist", "MNIST", "MNIST/raw"),
        ("fashion-mnist", "FashionMNIST", "apt-get"),
    ],
)
def test_missing_torchvision_dataset_names_expected_path(tmp_path, monkeypatch, name, cls, expected):
    import torchvision.datasets

    monkeypatch.setattr(getattr(torchvision.datasets, cls), "download", _fail_download)
    monkeypatch.setattr(files, "DEBIAN_FASHION_DIR", tmp_path / "nowhere")
    before = socket.getdefaulttimeout()
    with pytest.raises(DataError) as exc:
        load_splits(name, tmp_path)
    message = str(exc.value)
    assert expected in message and str(tmp_path) in message and "download failed: offline in tests" in message
    assert "\n" not in message
    assert socket.getdefaulttimeout() == before


def test_corrupt_cifar_folder_is_not_called_missing(tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", _fail_download)
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_text("garbage")
    with pytest.raises(DataError) as exc:
        load_splits("cifar10", tmp_path)
    message = str(exc.value)
    assert "exists but cannot be read" in message and "not found" not in message.split("(")[0]


def _no_checksums(monkeypatch, module_name, cls_name):
    """Let torchvision read the fake files: existence instead of the real MD5s; never download."""
    import importlib
    import os

    import torchvision.datasets

    module = importlib.import_module(f"torchvision.datasets.{module_name}")
    monkeypatch.setattr(module, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    monkeypatch.setattr(getattr(torchvision.datasets, cls_name), "download", _fail_download)


def _fake_cifar10(root: Path, per_batch: int = 3, n_test: int = 4):
    """CIFAR-10 python batches: uint8 rows of 3072 = R, G, B planes, each 32x32 row-major."""
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    written = {}
    parts = (("train", [f"data_batch_{i}" for i in range(1, 6)], per_batch), ("test", ["test_batch"], n_test))
    for part, names, n in parts:
        rows, labels = [], []
        for name in names:
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            batch_labels = rng.integers(0, 10, n).tolist()
            with open(folder / name, "wb") as f:
                pickle.dump({"data": data, "labels": batch_labels, "batch_label": name}, f)
            rows.append(data)
            labels += batch_labels
        written[part] = (np.concatenate(rows), labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}, f)
    return written


def test_cifar10_loader_reads_python_batches(tmp_path, monkeypatch):
    _no_checksums(monkeypatch, "cifar", "CIFAR10")
    written = _fake_cifar10(tmp_path)
    splits, info = load_splits("cifar10", tmp_path)
    assert info == DatasetInfo("cifar10", 10, 3, 32, 4, True) and splits["val"] is None
    for part, n in (("train", 15), ("test", 4)):
        rows, labels = written[part]
        images = splits[part].images
        assert images.shape == (n, 3, 32, 32) and images.dtype == torch.uint8 and images.is_contiguous()
        assert splits[part].labels.tolist() == labels and splits[part].labels.dtype == torch.int64
        # Pixel (c, h, w) of image i is byte c * 1024 + h * 32 + w of its row.
        for i, c, h, w in ((0, 0, 0, 1), (n - 1, 2, 31, 0), (n // 2, 1, 5, 17), (1, 2, 17, 5), (2, 0, 30, 2)):
            assert int(images[i, c, h, w]) == int(rows[i, c * 1024 + h * 32 + w]), (part, i, c, h, w)
        assert torch.equal(images.reshape(n, 3072), torch.from_numpy(rows))


def test_svhn_loader_reads_mat_files(tmp_path, monkeypatch):
    sio = pytest.importorskip("scipy.io")
    _no_checksums(monkeypatch, "svhn", "SVHN")
    rng = np.random.default_rng(1)
    written = {}
    for part, labels in (("train", [10, 1, 2, 10, 9]), ("test", [3, 10, 4])):
        n = len(labels)
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)  # the .mat layout: H x W x C x N
        sio.savemat(str(tmp_path / f"{part}_32x32.mat"), {"X": x, "y": np.array(labels, dtype=np.uint8)[:, None]})
        written[part] = (x, labels)
    splits, info = load_splits("svhn", tmp_path)
    assert info == DatasetInfo("svhn", 10, 3, 32, 4, False)
    for part in ("train", "test"):
        x, labels = written[part]
        images = splits[part].images
        assert images.shape == (len(labels), 3, 32, 32) and images.dtype == torch.uint8
        assert splits[part].labels.tolist() == [0 if v == 10 else v for v in labels]  # "10" is the digit 0
        for i, c, h, w in ((0, 0, 0, 1), (1, 2, 31, 0), (2, 1, 5, 17), (2, 1, 17, 5)):
            assert int(images[i, c, h, w]) == int(x[h, w, c, i]), (part, i, c, h, w)
        assert torch.equal(images, torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1))))


# ---------------------------------------------------------------- Tiny-ImageNet


def _jpeg(path: Path, value: int, channels: int = 3, size: int = 64):
    from torchvision.io import write_jpeg

    path.parent.mkdir(parents=True, exist_ok=True)
    write_jpeg(torch.full((channels, size, size), value, dtype=torch.uint8), str(path), quality=100)


def _fake_tiny(root: Path):
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("n02\nn01\n")  # not sorted: class = position in sorted wnids
    _jpeg(base / "train" / "n01" / "images" / "n01_0.JPEG", 40)
    _jpeg(base / "train" / "n01" / "images" / "n01_1.JPEG", 50, channels=1)  # grayscale
    _jpeg(base / "train" / "n02" / "images" / "n02_0.JPEG", 200)
    notes = []
    for i, (wnid, value) in enumerate((("n02", 210), ("n01", 30), ("n02", 220))):
        _jpeg(base / "val" / "images" / f"val_{i}.JPEG", value)
        notes.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(notes) + "\n")
    return base


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision.io's JPEG writer, since 0.29
def test_tiny_imagenet_folder(tmp_path):
    base = _fake_tiny(tmp_path)
    for data_dir in (tmp_path, base):
        splits, info = load_splits("tiny-imagenet", data_dir)
        train, test = splits["train"], splits["test"]
        assert train.images.shape == (3, 3, 64, 64) and test.images.shape == (3, 3, 64, 64)
        assert train.labels.tolist() == [0, 0, 1] and test.labels.tolist() == [1, 0, 1]
        means = train.images.float().mean((1, 2, 3))
        assert torch.allclose(means, torch.tensor([40.0, 50.0, 200.0]), atol=2)
        assert torch.equal(train.images[1, 0], train.images[1, 2])  # grayscale became RGB
        assert torch.allclose(test.images.float().mean((1, 2, 3)), torch.tensor([210.0, 30.0, 220.0]), atol=2)
        assert (info.num_classes, info.image_size, info.crop_padding) == (200, 64, 4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tiny_imagenet_errors(tmp_path):
    with pytest.raises(DataError, match="tiny-imagenet-200/wnids.txt"):
        load_splits("tiny-imagenet", tmp_path)
    base = _fake_tiny(tmp_path)
    _jpeg(base / "train" / "n01" / "images" / "n01_2.JPEG", 40, size=32)
    with pytest.raises(DataError, match="n01_2.JPEG is 32x32"):
        load_splits("tiny-imagenet", tmp_path)
