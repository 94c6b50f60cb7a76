"""Run by tests/test_distributed.py under torchrun: utils.training.distributed.gather_batch on uneven
shards (3 rows on rank 0, 2 on rank 1, sizes given), a float tensor that requires grad and a
bool mask; then on equal shards (sizes implied), with the host syncs of the gather and its
backward counted.

Each process computes the same loss from the gathered rows and writes what it gathered, the
gradient of its own rows and the sync count to <argv[1]>.<rank>.pt."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.host_syncs import HostSyncs  # noqa: E402
from utils.training import distributed  # noqa: E402


def main(out: str) -> None:
    ctx = distributed.init("cpu")
    rows = 3 - ctx.rank
    start = 0 if ctx.rank == 0 else 3
    values = (torch.arange(rows * 2, dtype=torch.float32).view(rows, 2) + 10 * start).requires_grad_(True)
    mask = torch.arange(start, start + rows) % 2 == 0
    gathered, gathered_mask = distributed.gather_batch(values, mask, rows=(3, 2))
    weights = torch.arange(gathered.numel(), dtype=torch.float32).view_as(gathered)
    (gathered * weights).sum().backward()

    even = torch.full((2, 2), float(ctx.rank)).requires_grad_(True)
    with HostSyncs() as syncs:
        gathered_even, even_mask = distributed.gather_batch(even, even[:, 0] > 0)
        (gathered_even * torch.arange(8.0).view(4, 2)).sum().backward()
    torch.save({"values": gathered.detach(), "mask": gathered_mask, "grad": values.grad,
                "even": gathered_even.detach(), "even_mask": even_mask, "even_grad": even.grad,
                "syncs": syncs.total}, f"{out}.{ctx.rank}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
