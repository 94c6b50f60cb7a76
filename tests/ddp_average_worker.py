"""Run by tests/test_distributed.py under torchrun: utils.training.distributed.average_gradients on a
module with parameters of several sizes and dtypes, one without a gradient (unused in the
step), one frozen, and an NHWC convolution weight.

Each process fills the gradients with its own numbers, averages them once per parameter with
one all_reduce each (the reference) and once through the buckets (a small bucket size, so that
there are several), counting the all_reduce calls. Writes both results, the call count and the
expected bucket count to <argv[1]>.<rank>.pt."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.training import distributed  # noqa: E402

BUCKET_BYTES = 1024


def module() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(40, 30), nn.Linear(30, 2), nn.Linear(2, 2))
    net[0].to(memory_format=torch.channels_last)
    net[2].double()
    net[3].requires_grad_(False)
    return net


def fill(net: nn.Module, rank: int) -> None:
    g = torch.Generator().manual_seed(rank)
    for name, p in net.named_parameters():
        p.grad = None
        if p.requires_grad and name != "1.bias":  # 1.bias: unused this step, no gradient yet
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if p.dim() == 4:
                p.grad = p.grad.contiguous(memory_format=torch.channels_last)


def main(out: str) -> None:
    ctx = distributed.init("cpu")
    net = module()
    fill(net, ctx.rank)
    reference = {}
    for name, p in net.named_parameters():
        if p.requires_grad:
            grad = torch.zeros_like(p) if p.grad is None else p.grad.clone()
            dist.all_reduce(grad)
            reference[name] = grad / ctx.world_size

    fill(net, ctx.rank)
    calls = []
    real = dist.all_reduce

    def counted(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counted
    try:
        distributed.average_gradients(net, bucket_bytes=BUCKET_BYTES)
    finally:
        dist.all_reduce = real
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    torch.save({"reference": reference,
                "bucketed": {n: p.grad for n, p in net.named_parameters() if p.requires_grad},
                "frozen_grad": [p.grad for p in net[3].parameters()],
                "channels_last": net[0].weight.grad.is_contiguous(memory_format=torch.channels_last),
                "calls": calls, "buckets": len(distributed.buckets(grads, BUCKET_BYTES)),
                "parameters": len(grads)}, f"{out}.{ctx.rank}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
