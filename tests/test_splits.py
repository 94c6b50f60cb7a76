"""utils/data/splits.py: a split held in memory."""

import torch

from tests.test_data_loaders import indexed_split
from utils.data.loaders import BatchLoader


def test_split_to_device_and_loader_device():
    split = indexed_split(6).to("cpu")
    x, y = next(iter(BatchLoader(split, 6, device=torch.device("cpu"))))
    assert x.device.type == "cpu" and y.device.type == "cpu"
