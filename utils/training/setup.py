"""What every training stage sets up before its first epoch: the device, the seeded data and its
loaders, the model (fresh for stages 1 and 3, frozen for stage 2) and its fast path."""
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import torch._functorch.config as functorch_config
import torch.nn as nn

from models.custom import Normalization, build_model
from utils.data.loaders import BatchLoader, load_splits
from utils.data.splits import DatasetInfo
from utils.script import UserError
from utils.training import distributed
from utils.training.checkpoint import load_weights, writable_dir
from utils.training.device import prepare_device, seed_everything
from utils.training.fast import FastPath


class DataSpec(NamedTuple):
    """What a stage reads (``add_data_args``): the dataset, its seeded subsets and the hold-out."""
    dataset: str
    data_dir: str
    batch_size: int
    seed: int = 0
    train_limit: Optional[int] = None
    test_limit: Optional[int] = None
    val_size: Optional[int] = None  # None: the dataset's default hold-out


class DeviceSpec(NamedTuple):
    """Where a stage runs (``--device``, ``--no-cudnn-benchmark``, ``--tf32``)."""
    device: str = "auto"
    cudnn_benchmark: bool = True
    tf32: bool = False


@dataclass(frozen=True)
class StageSetup:
    """What ``setup`` returns: the device, the dataset's info, the two loaders and the count held out."""
    device: torch.device
    info: DatasetInfo
    train_loader: BatchLoader
    eval_loader: BatchLoader
    generator: torch.Generator  # the training loader's: last.pth keeps its state
    held_out: int  # images held out for selection; config.json records it as val_size


def setup(model_dir, data: DataSpec, where: DeviceSpec = DeviceSpec()) -> StageSetup:
    """Check ``model_dir``, pick the device, seed, load the splits and build the loaders.

    The training loader shuffles and augments with its own seeded generator, so a resumed run
    sees the same batches. Under torchrun, ``data.batch_size`` is the global batch: each process
    takes its shard of every batch and of the evaluation split."""
    writable_dir(model_dir, "--model-dir")  # before loading anything
    device = prepare_device(where.device, data.batch_size, cudnn_benchmark=where.cudnn_benchmark, tf32=where.tf32)
    seed_everything(data.seed)
    splits, info = load_splits(data.dataset, data.data_dir, train_limit=data.train_limit,
                               test_limit=data.test_limit, val_size=data.val_size, seed=data.seed)
    generator = torch.Generator().manual_seed(data.seed)
    train_loader, eval_loader = training_loaders(data.batch_size, splits, info, device, generator)
    held_out = 0 if splits["val"] is None else len(splits["val"])
    return StageSetup(device, info, train_loader, eval_loader, generator, held_out)


def fresh_model(arch: str, info: DatasetInfo, device, fast: FastPath = FastPath(),
                normalize: Optional[Normalization] = None) -> nn.Module:
    """Stages 1 and 3: a newly initialised ``arch``, with the fast path and DDP as ``fast`` asks."""
    return speed_up(training_model(arch, info, normalize).to(device), fast)


def training_model(arch: str, info: DatasetInfo, normalize: Optional[Normalization] = None) -> nn.Module:
    """``arch``, normalising its inputs inside ``forward`` when ``normalize`` is given (``--normalize``)."""
    try:
        return build_model(arch, info.num_classes, info.in_channels, normalize)
    except ValueError as err:
        raise UserError(f"--normalize: {err}") from None


class SGDSpec(NamedTuple):
    """SGD with momentum and weight decay, and MultiStepLR (PAPER.md §7; ``add_optim_args``)."""
    lr: float
    momentum: float
    weight_decay: float
    milestones: Sequence[int]
    gamma: float


def sgd(model: nn.Module, spec: SGDSpec):
    """SGD with momentum and weight decay, and MultiStepLR (PAPER.md §7)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum,
                                weight_decay=spec.weight_decay)
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(spec.milestones),
                                                           gamma=spec.gamma)


def frozen_target(arch: str, path, info: DatasetInfo, device, fast: FastPath = FastPath(),
                  normalize: Optional[Normalization] = None) -> nn.Module:
    """Stage 2: the target h_θ0 of ``--pre-target``, in eval mode without parameter gradients."""
    target = training_model(arch, info, normalize)
    load_weights(target, path, "--pre-target", f"--arch {arch} with {info.num_classes} classes")
    target.to(device).eval().requires_grad_(False)
    if fast.channels_last:
        target = target.to(memory_format=torch.channels_last)
    if fast.compile:
        target = compiled(target, fast.compile_backend)
    return target


def speed_up(model: nn.Module, fast: FastPath) -> nn.Module:
    """channels_last, SyncBatchNorm, torch.compile and DDP, as ``fast`` asks; returns what to train.

    The plain module stays reachable through ``bare_module`` for checkpoints."""
    if fast.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if fast.sync_bn and distributed.context().enabled:
        if next(model.parameters()).device.type != "cuda":
            raise UserError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm has no CPU implementation)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if fast.compile:
        model = compiled(model, fast.compile_backend)
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
    # The gradient balance (utils.training.balance.grad_balance) differentiates a step's graph with
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
