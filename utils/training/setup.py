"""What every training stage sets up before its first epoch: the device, the seeded data and its
loaders, the model (fresh for stages 1 and 3, frozen for stage 2) and its fast path."""
from typing import NamedTuple

import torch
import torch._functorch.config as functorch_config
import torch.nn as nn

from models.custom import build_model, parse_normalization
from utils.data.loaders import BatchLoader, load_splits
from utils.data.splits import DatasetInfo
from utils.script import UserError
from utils.training import distributed
from utils.training.checkpoint import load_weights, writable_dir
from utils.training.device import prepare_device, seed_everything


class Setup(NamedTuple):
    device: torch.device
    info: DatasetInfo
    train_loader: BatchLoader
    eval_loader: BatchLoader
    generator: torch.Generator  # the training loader's: last.pth keeps its state


def setup(args) -> Setup:
    """Check --model-dir, pick the device, seed, load the splits and build the loaders.

    The training loader shuffles and augments with its own seeded generator, so a resumed run
    sees the same batches. Under torchrun, --batch-size is the global batch: each process takes
    its shard of every batch and of the evaluation split. ``args.val_size`` becomes the number of
    held-out images, which config.json then records."""
    writable_dir(args.model_dir, "--model-dir")  # before loading anything
    device = prepare_device(args.device, args.batch_size, cudnn_benchmark=not args.no_cudnn_benchmark, tf32=args.tf32)
    seed_everything(args.seed)
    splits, info = load_splits(args.dataset, args.data_dir, train_limit=args.train_limit,
                               test_limit=args.test_limit, val_size=args.val_size, seed=args.seed)
    # The default hold-out depends on the training split's size: config.json records the count.
    args.val_size = 0 if splits["val"] is None else len(splits["val"])
    generator = torch.Generator().manual_seed(args.seed)
    train_loader, eval_loader = training_loaders(args.batch_size, splits, info, device, generator)
    return Setup(device, info, train_loader, eval_loader, generator)


def fresh_model(args, info: DatasetInfo, device) -> nn.Module:
    """Stages 1 and 3: a newly initialised ``--arch``, with the fast path and DDP as the flags ask."""
    return speed_up(training_model(args, info).to(device), args)


def training_model(args, info: DatasetInfo) -> nn.Module:
    """``--arch``, normalising its inputs inside ``forward`` under ``--normalize``."""
    normalize = getattr(args, "normalize", None)
    try:
        return build_model(args.arch, info.num_classes, info.in_channels,
                           parse_normalization(normalize) if normalize else None)
    except ValueError as err:
        raise UserError(f"--normalize: {err}") from None


def sgd(model: nn.Module, args):
    """SGD with momentum and weight decay, and MultiStepLR (PAPER.md §7)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.lr_milestones,
                                                           gamma=args.lr_gamma)


def frozen_target(args, info: DatasetInfo, device) -> nn.Module:
    """Stage 2: the target h_θ0 of ``--pre-target``, in eval mode without parameter gradients."""
    target = training_model(args, info)
    load_weights(target, args.pre_target, "--pre-target", f"--arch {args.arch} with {info.num_classes} classes")
    target.to(device).eval().requires_grad_(False)
    if args.channels_last:
        target = target.to(memory_format=torch.channels_last)
    if args.compile:
        target = compiled(target, args.compile_backend)
    return target


def speed_up(model: nn.Module, args) -> nn.Module:
    """channels_last, SyncBatchNorm, torch.compile and DDP, as the flags ask; returns what to train.

    The plain module stays reachable through ``bare_module`` for checkpoints."""
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.sync_bn and distributed.context().enabled:
        if next(model.parameters()).device.type != "cuda":
            raise UserError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm has no CPU implementation)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.compile:
        model = compiled(model, args.compile_backend)
    return distributed.wrap(model)


def compiled(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """``torch.compile(model, backend=backend)``, with room for every graph a run needs.

    Dynamo compiles one graph per combination it meets: train or eval mode, parameter
    gradients on or off (attacks switch them off), grad mode and input gradients. A NAMID run
    with TRADES needs 7; past the default limit of 8, Dynamo would fall back to eager mode
    without a word. The smaller last batch is kept, not padded or dropped: Dynamo then marks
    the batch dimension dynamic and compiles one graph that serves every size (docs/usage.md)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 32))
    # The gradient balance (utils.training.losses.grad_balance) differentiates a step's graph with
    # retain_graph=True before the step's backward; AOTAutograd's donated buffers would free the
    # saved tensors at the first of those calls, and refuse them.
    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False
    return torch.compile(model, backend=backend)


def shard(split, ctx=None):
    """This process's share of an evaluation split: every world_size-th sample, no padding, so
    the summed counts are exact."""
    ctx = ctx or distributed.context()
    if not ctx.enabled:
        return split
    return split.subset(torch.arange(ctx.rank, len(split), ctx.world_size))


def training_loaders(batch_size: int, splits, info, device, generator: torch.Generator):
    """The shuffled, augmented training loader (this process's share of each --batch-size batch)
    and the loader of this process's shard of the selection split (val if held out, else test)."""
    ctx = distributed.context()
    train_loader = BatchLoader(splits["train"].to(device), batch_size // ctx.world_size, shuffle=True,
                               augment=True, info=info, device=device, generator=generator, rank=ctx.rank,
                               world_size=ctx.world_size)
    eval_split = splits["val"] if splits["val"] is not None else splits["test"]
    return train_loader, BatchLoader(shard(eval_split).to(device), batch_size, device=device)
