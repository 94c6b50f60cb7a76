"""Devices, seeds and random-number state: what a run needs to start, and to resume drawing the
same numbers."""
import random
from typing import Optional

import numpy as np
import torch

from utils.script import UserError
from utils.training import distributed


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


# RNG state, so that a resumed run draws the same numbers as an uninterrupted one.

def rng_state(generator: Optional[torch.Generator] = None) -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
    }
    if torch.cuda.is_initialized():  # this process's GPU: under torchrun the others belong to other processes
        state["cuda"] = torch.cuda.get_rng_state()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: Optional[torch.Generator] = None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # an older last.pth: one state per GPU it saw
            index = torch.cuda.current_device()
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def set_tf32(enabled: bool) -> None:
    """``--tf32``: whether float32 matrix products on CUDA may use TF32 (docs/choices.md "TF32").

    cuDNN's convolutions are left as PyTorch has them (TF32 allowed). Only the precision API is
    used: mixing it with the newer per-backend ``fp32_precision`` settings is an error in PyTorch."""
    torch.set_float32_matmul_precision("high" if enabled else "highest")


def prepare_device(name: str, batch_size: int, cudnn_benchmark: bool = True, tf32: bool = False) -> torch.device:
    """Join torchrun's process group if launched by it, pick this process's device (``--device``),
    and on CUDA set cudnn.benchmark (fixed input shapes: let cuDNN pick the fastest kernels) and
    TF32 for matrix products (``set_tf32``; a CPU run keeps full fp32 products either way)."""
    ctx = distributed.init(name)
    device = distributed.device_for(resolve_device(name))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark
        set_tf32(tf32)
    if ctx.enabled and batch_size % ctx.world_size:
        raise UserError(f"--batch-size {batch_size} is the global batch: it must divide evenly over "
                        f"{ctx.world_size} processes")
    return device
