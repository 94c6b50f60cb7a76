"""utils/data/synthetic.py: seeded class-conditional test images."""

import torch

from tests.test_data_loaders import synthetic
from utils.data.splits import DatasetInfo


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
