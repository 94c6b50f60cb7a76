"""utils/data.py, utils/dataset_files.py, utils/synthetic.py, utils/splits.py and data/make_npy.py: loading, limits,
batching, augmentation, file formats."""

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
from utils import data as D
from utils import dataset_files as files
from utils.data import (
    BatchLoader,
    crop_flip,
    dataset_info,
    load_splits,
)
from utils.dataset_files import read_idx
from utils.splits import DataError, DatasetInfo, Split

ROOT = Path(__file__).resolve().parents[1]


def _load_make_npy():
    spec = importlib.util.spec_from_file_location("make_npy", ROOT / "data" / "make_npy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_npy = _load_make_npy()


def synthetic(**kw):
    kw.setdefault("synthetic_size", (60, 30))
    kw.setdefault("synthetic_shape", (3, 16, 16))
    kw.setdefault("synthetic_classes", 4)
    return load_splits("synthetic", None, **kw)


def rows(split: Split):
    """Each image as bytes: synthetic images are noisy enough to be unique."""
    return [bytes(x.numpy().tobytes()) for x in split.images]


def indexed_split(n: int) -> Split:
    """Image i is filled with the value i, so a batch tells which samples it holds."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return Split(images, torch.arange(n))


def ids(x: torch.Tensor) -> list:
    return (x[:, 0, 0, 0] * 255).round().long().tolist()


# ---------------------------------------------------------------- synthetic data, names, limits


def test_synthetic_shapes_dtypes_range():
    splits, info = synthetic()
    assert info == DatasetInfo("synthetic", 4, 3, 16, 2, True)
    assert splits["val"] is None
    for name, n in (("train", 60), ("test", 30)):
        s = splits[name]
        assert len(s) == n
        assert s.images.shape == (n, 3, 16, 16) and s.images.dtype == torch.uint8
        assert s.labels.dtype == torch.int64 and set(s.labels.tolist()) == {0, 1, 2, 3}
    assert splits["train"].images.float().std() > 20  # not a constant image


def test_synthetic_is_seeded():
    a, _ = synthetic(seed=5)
    b, _ = synthetic(seed=5)
    c, _ = synthetic(seed=6)
    for part in ("train", "test"):
        assert torch.equal(a[part].images, b[part].images) and torch.equal(a[part].labels, b[part].labels)
    assert not torch.equal(a["train"].images, c["train"].images)


def test_synthetic_is_learnable_by_nearest_class_mean():
    splits, _ = synthetic(synthetic_size=(200, 100))
    train, test = splits["train"], splits["test"]
    means = torch.stack([train.images[train.labels == k].float().mean(0) for k in range(4)]).flatten(1)
    pred = torch.cdist(test.images.float().flatten(1), means).argmin(1)
    assert (pred == test.labels).float().mean() > 0.95


def test_names_and_static_info():
    assert D.canonical_name("Fashion_MNIST") == "fashion-mnist"
    assert dataset_info("cifar10") == DatasetInfo("cifar10", 10, 3, 32, 4, True)
    tiny = dataset_info("tiny_imagenet")  # crop padding 4 px: PAPER.md §7
    assert (tiny.num_classes, tiny.in_channels, tiny.image_size, tiny.crop_padding) == (200, 3, 64, 4)
    assert not dataset_info("svhn").flip and not dataset_info("mnist").flip
    assert dataset_info("fashion-mnist").in_channels == 1
    with pytest.raises(DataError, match="cifar10, cifar100, svhn"):
        load_splits("imagenet", "data")
    with pytest.raises(DataError, match="no/such/dir"):
        load_splits("cifar10", "no/such/dir")


def test_limits_are_seeded_ordered_and_val_is_disjoint():
    full, _ = synthetic(seed=3)
    a, _ = synthetic(train_limit=40, test_limit=20, val_size=10, seed=3)
    b, _ = synthetic(train_limit=40, test_limit=20, val_size=10, seed=3)
    c, _ = synthetic(train_limit=40, test_limit=20, val_size=10, seed=4)
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (30, 10, 20)
    for part in ("train", "val", "test"):
        assert torch.equal(a[part].images, b[part].images)
    assert not torch.equal(a["train"].images, c["train"].images)

    position = {r: i for i, r in enumerate(rows(full["train"]))}
    train_pos = [position[r] for r in rows(a["train"])]
    val_pos = [position[r] for r in rows(a["val"])]
    assert train_pos == sorted(train_pos) and val_pos == sorted(val_pos)  # original order kept
    assert not set(train_pos) & set(val_pos)
    test_rows = set(rows(full["test"]))
    assert all(r in test_rows for r in rows(a["test"]))


def test_default_val_size_holds_out_1000_or_a_tenth():
    """val_size=None (the training scripts' default) holds out images for model selection."""
    from utils.data import default_val_size

    assert default_val_size(50_000) == 1000 and default_val_size(6_000) == 600 and default_val_size(5) == 1
    splits, _ = synthetic(train_limit=50, val_size=None)
    assert (len(splits["train"]), len(splits["val"])) == (45, 5)
    assert synthetic(train_limit=50)[0]["val"] is None  # load_splits itself holds out nothing by default


@pytest.mark.parametrize(
    "kw, flag",
    [
        ({"train_limit": 61}, "--train-limit"),
        ({"test_limit": 31}, "--test-limit"),
        ({"train_limit": 0}, "--train-limit"),
        ({"val_size": 60}, "--val-size"),
        ({"train_limit": 10, "val_size": 10}, "--val-size"),
    ],
)
def test_oversize_limits_name_the_flag(kw, flag):
    with pytest.raises(DataError, match=flag):
        synthetic(**kw)


# ---------------------------------------------------------------- batching


def test_loader_plain_batches_in_order():
    split = indexed_split(10)
    loader = BatchLoader(split, 4)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape == (4, 1, 4, 4) and y.dtype == torch.int64
    assert sum((ids(x) for x, _ in batches), []) == list(range(10))
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(10))
    assert len(BatchLoader(split, 4, drop_last=True)) == len(list(BatchLoader(split, 4, drop_last=True))) == 2


def test_split_to_device_and_loader_device():
    split = indexed_split(6).to("cpu")
    x, y = next(iter(BatchLoader(split, 6, device=torch.device("cpu"))))
    assert x.device.type == "cpu" and y.device.type == "cpu"


def _reference_crop_flip(images, top, left, flip, pad):
    padded = torch.nn.functional.pad(images, (pad,) * 4)
    out = []
    for i in range(len(images)):
        h, w = images.shape[-2:]
        crop = padded[i, :, top[i] : top[i] + h, left[i] : left[i] + w]
        out.append(crop.flip(-1) if flip[i] else crop)
    return torch.stack(out)


def test_crop_flip_matches_per_sample_reference():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=g)
    top, left = torch.randint(0, 5, (16,), generator=g), torch.randint(0, 5, (16,), generator=g)
    flip = torch.randint(0, 2, (16,), generator=g).bool()
    expected = _reference_crop_flip(images, top, left, flip, 2)
    assert torch.equal(crop_flip(images, top, left, flip, 2), expected)


def test_crop_flip_identity_shift_and_flip():
    images = torch.randint(0, 256, (2, 1, 6, 6), dtype=torch.uint8)
    centre, no = torch.full((2,), 3), torch.zeros(2, dtype=torch.bool)
    assert torch.equal(crop_flip(images, centre, centre, no, 3), images)
    assert torch.equal(crop_flip(images, centre, centre, ~no, 3), images.flip(-1))
    down = crop_flip(images, torch.zeros(2, dtype=torch.long), centre, no, 3)
    assert torch.equal(down[..., 3:, :], images[..., :3, :]) and not down[..., :3, :].any()


def test_augmentation_keeps_range_and_moves_pixels():
    splits, info = synthetic()
    train = splits["train"]
    plain = torch.cat([x for x, _ in BatchLoader(train, 16)])
    loader = BatchLoader(train, 16, augment=True, info=info, generator=torch.Generator().manual_seed(0))
    aug = torch.cat([x for x, _ in loader])
    assert aug.shape == plain.shape and aug.dtype == torch.float32
    assert aug.min() >= 0 and aug.max() <= 1
    changed = (aug != plain).flatten(1).any(1)
    assert changed.float().mean() > 0.8  # 1/25 of crops are centred, and half of those unflipped
    # Zero padding shows up as black borders on shifted images.
    assert (aug == 0).float().mean() > (plain == 0).float().mean()


def test_augmentation_is_a_no_op_without_padding_or_flip():
    splits, _ = synthetic()
    train = splits["train"]
    info = DatasetInfo("synthetic", 4, 3, 16, 0, False)
    plain = [x for x, _ in BatchLoader(train, 16)]
    aug = [x for x, _ in BatchLoader(train, 16, augment=True, info=info, generator=torch.Generator())]
    assert all(torch.equal(a, b) for a, b in zip(aug, plain))


def test_flip_only_mirrors_and_preserves_pixels():
    splits, _ = synthetic()
    train = splits["train"]
    info = DatasetInfo("synthetic", 4, 3, 16, 0, True)
    plain = torch.cat([x for x, _ in BatchLoader(train, 16)])
    loader = BatchLoader(train, 16, augment=True, info=info, generator=torch.Generator())
    aug = torch.cat([x for x, _ in loader])
    same = (aug == plain).flatten(1).all(1)
    mirrored = (aug == plain.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and 0 < mirrored.sum() < len(train)


def _epoch(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b):
    return len(a) == len(b) and all(
        torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b)
    )


def test_same_seed_same_batches():
    splits, info = synthetic()

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return _epoch(BatchLoader(splits["train"], 16, shuffle=True, augment=True, info=info, generator=g))

    assert _same(run(7), run(7))
    assert not _same(run(7), run(8))


def test_restored_generator_replays_the_epoch():
    splits, info = synthetic()
    g = torch.Generator().manual_seed(0)
    loader = BatchLoader(splits["train"], 16, shuffle=True, augment=True, info=info, generator=g)
    first = _epoch(loader)
    state = g.get_state()
    second = _epoch(loader)
    assert not _same(first, second)
    g.set_state(state)
    assert _same(_epoch(loader), second)
    # A pass stopped after one batch consumes the same randomness as a full one.
    g.set_state(state)
    next(iter(loader))
    after_partial = g.get_state()
    g.set_state(state)
    _epoch(loader)
    assert torch.equal(after_partial, g.get_state())


@pytest.mark.parametrize("n, drop_last", [(20, False), (21, False), (21, True)])
def test_rank_shards_partition_the_data(n, drop_last):
    split = indexed_split(n)
    shards = []
    for rank in range(2):
        g = torch.Generator().manual_seed(3)  # ranks share the seed
        loader = BatchLoader(
            split, 3, shuffle=True, generator=g, rank=rank, world_size=2, drop_last=drop_last
        )
        batches = list(loader)
        assert len(batches) == len(loader)
        shards.append(sum((ids(x) for x, _ in batches), []))
    assert len(BatchLoader(split, 3, rank=0, world_size=2, drop_last=drop_last)) == len(
        BatchLoader(split, 3, rank=1, world_size=2, drop_last=drop_last)
    )
    union = shards[0] + shards[1]
    if n % 2 == 0:
        assert sorted(union) == list(range(n))  # an exact partition
    elif drop_last:
        assert len(set(union)) == len(union) == 2 * (n // 2 // 3 * 3)
    else:
        assert set(union) == set(range(n)) and len(union) == n + 1  # one sample repeated to even out


def test_crop_offsets_cover_the_whole_padded_range():
    """Every offset 0..2*pad, extremes included, for rows and columns (an off-by-one drops 2*pad)."""
    pad, side, n = 4, 12, 900
    split = Split(torch.full((n, 1, side, side), 255, dtype=torch.uint8), torch.zeros(n, dtype=torch.int64))
    info = DatasetInfo("synthetic", 2, 1, side, pad, False)
    loader = BatchLoader(split, 300, augment=True, info=info, generator=torch.Generator().manual_seed(0))
    x = torch.cat([b for b, _ in loader])[:, 0]
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    lit_rows, lit_cols = (x > 0).any(2), (x > 0).any(1)  # (n, side): which rows / columns show the image
    # A crop at offset t of the zero-padded image: pad - t black rows above if t < pad, t - pad below if t > pad.
    top = pad - lit_rows.float().argmax(1) + (~lit_rows).flip(1).cumprod(1).sum(1)
    left = pad - lit_cols.float().argmax(1) + (~lit_cols).flip(1).cumprod(1).sum(1)
    for offsets, lit in ((top, lit_rows), (left, lit_cols)):
        assert torch.equal(lit.sum(1), side - (offsets - pad).abs())  # one contiguous band of the image
        counts = torch.bincount(offsets, minlength=2 * pad + 1)
        assert len(counts) == 2 * pad + 1  # no offset beyond 2*pad
        assert counts.min() >= n // (2 * pad + 1) // 2  # each of the 9 offsets, roughly uniformly
    # Inside the lit rectangle every pixel is the image's; everything else is padding.
    expected = lit_rows[:, :, None] & lit_cols[:, None, :]
    assert torch.equal(x > 0, expected)


def test_rank_shards_with_augmentation_interleave_the_single_process_batches():
    """BatchLoader promises: ranks sharing a seed take every world_size-th position of one
    permutation, and augmentation is drawn for every position whatever the rank. So rank r's
    batch of 2 is positions r and r + 4 of the single-process batch of 8, crops and flips included."""
    splits, info = synthetic(synthetic_size=(16, 4))
    train = splits["train"]

    def passes(batch_size, **kw):
        g = torch.Generator().manual_seed(11)
        loader = BatchLoader(train, batch_size, shuffle=True, augment=True, info=info, generator=g, **kw)
        return [_epoch(loader) for _ in range(2)], g.get_state()

    single, state = passes(8)
    # Same seed, no augmentation: the same permutation (drawn first), so this shows the crops and flips act.
    plain = _epoch(BatchLoader(train, 8, shuffle=True, generator=torch.Generator().manual_seed(11)))
    assert all(torch.equal(y, py) and not torch.equal(x, px) for (x, y), (px, py) in zip(single[0], plain))
    for rank in range(4):
        shard, rank_state = passes(2, rank=rank, world_size=4)
        assert torch.equal(rank_state, state)  # all ranks advance the generator alike
        for epoch, rank_epoch in zip(single, shard):
            assert len(rank_epoch) == len(epoch) == 2
            for (x, y), (rx, ry) in zip(epoch, rank_epoch):
                assert torch.equal(rx, x[rank::4]) and torch.equal(ry, y[rank::4])
    assert not _same(single[0], single[1])  # the second pass draws afresh


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
