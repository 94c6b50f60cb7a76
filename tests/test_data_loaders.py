"""utils/data/loaders.py: dataset names, limits and the validation hold-out, batching and augmentation."""

import pytest
import torch

from utils.data import loaders as D
from utils.data.loaders import (
    BatchLoader,
    crop_flip,
    dataset_info,
    load_splits,
)
from utils.data.splits import DataError, DatasetInfo, Split


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


# ---------------------------------------------------------------- names, limits


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
    from utils.data.loaders import default_val_size

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
