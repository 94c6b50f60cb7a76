"""Multi-process training through torchrun: one process per GPU (or per CPU worker with gloo).

``torchrun --nproc_per_node N script.py ...`` sets WORLD_SIZE, RANK and LOCAL_RANK; without
them everything here is a no-op and the scripts run as one process."""
import gc
import inspect
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CONTEXT = Context()


def context() -> Context:
    return _CONTEXT


def init(device_flag: str) -> Context:
    """Join the process group when launched by torchrun (nccl on CUDA, gloo on CPU)."""
    global _CONTEXT
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        _CONTEXT = Context()
        return _CONTEXT
    if not dist.is_initialized():
        use_cuda = device_flag != "cpu" and torch.cuda.is_available()
        options = {}
        if use_cuda:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            # Binds the group to this GPU: NCCL connects eagerly, and barriers need not guess the device.
            if "device_id" in inspect.signature(dist.init_process_group).parameters:  # PyTorch ≥ 2.3
                options["device_id"] = torch.device("cuda", local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", **options)
    _CONTEXT = Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return _CONTEXT


def device_for(device: torch.device) -> torch.device:
    """Each process drives its own GPU."""
    if device.type == "cuda" and _CONTEXT.enabled:
        return torch.device("cuda", _CONTEXT.local_rank)
    return device


def wrap(model: nn.Module, sync_bn: bool = False) -> nn.Module:
    """DistributedDataParallel (and SyncBatchNorm on request) when running under torchrun."""
    if not _CONTEXT.enabled:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def all_gather_object(obj) -> list:
    """Every process's ``obj`` (picklable), in rank order; one process: ``[obj]``."""
    if not _CONTEXT.enabled:
        return [obj]
    found = [None] * _CONTEXT.world_size
    dist.all_gather_object(found, obj)
    return found


def seed_ranks(seed: int) -> None:
    """Give each process its own stream of attack noise (PGD's random starts), as one process
    draws independent noise for every sample of the global batch; without this, every process
    would repeat the first one's draws on its own shard.

    Call it once the models are built: they come from the common seed (DDP and the averaged
    stage-2 estimators start from the same weights on every process). The first process keeps
    its stream, so a one-process run is unchanged."""
    if _CONTEXT.enabled and _CONTEXT.rank > 0:
        torch.manual_seed(seed + 100_003 * _CONTEXT.rank)  # also seeds every CUDA device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes, in place. NCCL reduces CUDA tensors only: a host tensor makes the
    round trip through this process's GPU (the callers keep their sums on the device anyway)."""
    if not _CONTEXT.enabled:
        return tensor
    if tensor.device.type == "cpu" and dist.get_backend() == "nccl":
        staged = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(staged, op=dist.ReduceOp.SUM)
        tensor.copy_(staged)
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_batch(*tensors: torch.Tensor, rows: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, ...]:
    """Each tensor's rows from every process, concatenated in rank order: the global batch that
    one process would hold. The MI terms need it: their negatives, batch cosines and means over
    W range over the whole batch, not over one process's shard.

    ``rows``: each process's row count, in rank order. By default every process holds as many
    rows as this one, as in each batch of the training loader, which pads every process's share
    of an epoch to the same length (``BatchLoader``). Known sizes keep the gather free of host
    syncs: learning them from the other processes would read a tensor back every step.

    Every process then computes the same loss from the gathered rows; a gathered tensor that
    requires grad sends each process the gradient of its own rows, summed over processes, which
    DDP's averaging turns back into the one-process gradient. One process: returned unchanged."""
    if not _CONTEXT.enabled:
        return tensors
    rows = [tensors[0].shape[0]] * _CONTEXT.world_size if rows is None else [int(n) for n in rows]
    if len(rows) != _CONTEXT.world_size:
        raise ValueError(f"gather_batch: {len(rows)} row counts for {_CONTEXT.world_size} processes")
    return tuple(_GatherRows.apply(t, rows) if t.requires_grad else _gather_rows(t, rows) for t in tensors)


def _gather_rows(tensor: torch.Tensor, rows: List[int]) -> torch.Tensor:
    if tensor.shape[0] != rows[_CONTEXT.rank]:
        raise ValueError(f"gather_batch: a tensor of {tensor.shape[0]} rows in a shard of {rows[_CONTEXT.rank]}")
    flag = tensor.dtype == torch.bool  # not every backend reduces or gathers bool
    t = tensor.to(torch.uint8) if flag else tensor
    if t.shape[0] == max(rows):
        padded = t.contiguous()
    else:  # all_gather moves equal shapes: pad to the largest shard
        padded = t.new_zeros((max(rows), *t.shape[1:]))
        padded[: t.shape[0]] = t
    pieces = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(pieces, padded)
    out = torch.cat([piece[:n] for piece, n in zip(pieces, rows)])
    return out.bool() if flag else out


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, rows):
        ctx.rows = rows
        return _gather_rows(tensor.detach(), rows)

    @staticmethod
    def backward(ctx, grad):
        # all_reduce rather than reduce_scatter: gloo has no reduce_scatter.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.rows[: _CONTEXT.rank])
        return grad[start: start + ctx.rows[_CONTEXT.rank]], None


# DDP's default bucket size: few enough collectives, each large enough to run at full bandwidth.
BUCKET_BYTES = 25 * 2**20


def buckets(tensors: Sequence[torch.Tensor], limit: int = BUCKET_BYTES) -> List[List[torch.Tensor]]:
    """``tensors`` in order, grouped into runs of one dtype and device of at most ``limit`` bytes
    each (a larger tensor makes a bucket of its own)."""
    groups: List[List[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        last = groups[-1][-1] if groups else None
        if last is None or (t.dtype, t.device) != (last.dtype, last.device) or size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += nbytes
    return groups


def average_gradients(model: nn.Module, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Average parameter gradients over processes, for modules trained without DDP's wrapper.

    One all_reduce per bucket of at most ``bucket_bytes`` (``buckets``), on a flat copy of its
    gradients, rather than one per parameter: each collective has a fixed cost."""
    if not _CONTEXT.enabled:
        return
    grads = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:  # every process must reduce the same buckets, used or not
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    for bucket in buckets(grads, bucket_bytes):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(_CONTEXT.world_size)
        for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(part.view(g.shape))


def barrier() -> None:
    if _CONTEXT.enabled:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group together: a rank that tears gloo down while another still uses it
    can abort at exit ("terminate called without an active exception")."""
    global _CONTEXT
    if dist.is_initialized():
        # DDP's reducer sits in reference cycles: free it now, or it keeps the process group
        # alive until interpreter teardown, where destroying it can abort the process.
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    _CONTEXT = Context()
