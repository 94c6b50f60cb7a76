"""Run by tests/test_distributed.py, alone or under torchrun: one training step's gradients.

Writes the averaged parameter gradients of the first augmented, shuffled batch (global
batch 16) to the path in argv[1], from the first process only."""
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.data.loaders import BatchLoader, load_splits  # noqa: E402
from utils.training import distributed  # noqa: E402


def gradients() -> dict:
    ctx = distributed.context()
    torch.manual_seed(0)
    # No BatchNorm and no dropout: the only per-process work is the shard of the batch.
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 15 * 15, 10))
    model = distributed.wrap(net)
    splits, info = load_splits("synthetic", "data", train_limit=64, seed=0)
    loader = BatchLoader(splits["train"], 16 // ctx.world_size, shuffle=True, augment=True, info=info,
                         generator=torch.Generator().manual_seed(0), rank=ctx.rank, world_size=ctx.world_size)
    x, y = next(iter(loader))
    F.cross_entropy(model(x), y).backward()
    return {k: p.grad for k, p in net.named_parameters()}


def save_gradients(compute, out: str) -> None:
    """Join torchrun's group (if any), run ``compute()`` and save its dict from the first process."""
    ctx = distributed.init("cpu")
    grads = compute()
    if ctx.is_main:
        torch.save(grads, out)
    # The DDP wrapper is gone with compute()'s frame: a process group destroyed while DDP still
    # holds it can abort the process at exit.
    distributed.shutdown()


if __name__ == "__main__":
    save_gradients(gradients, sys.argv[1])
