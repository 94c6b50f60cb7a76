"""Run by tests/test_distributed.py under torchrun: utils.distributed.gather_batch on uneven
shards (3 rows on rank 0, 2 on rank 1), a float tensor that requires grad and a bool mask.

Each process computes the same loss from the gathered rows and writes what it gathered and
the gradient of its own rows to <argv[1]>.<rank>.pt."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import distributed  # noqa: E402


def main(out: str) -> None:
    ctx = distributed.init("cpu")
    rows = 3 - ctx.rank
    start = 0 if ctx.rank == 0 else 3
    values = (torch.arange(rows * 2, dtype=torch.float32).view(rows, 2) + 10 * start).requires_grad_(True)
    mask = torch.arange(start, start + rows) % 2 == 0
    gathered, gathered_mask = distributed.gather_batch(values, mask)
    weights = torch.arange(gathered.numel(), dtype=torch.float32).view_as(gathered)
    (gathered * weights).sum().backward()
    torch.save({"values": gathered.detach(), "mask": gathered_mask, "grad": values.grad}, f"{out}.{ctx.rank}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
