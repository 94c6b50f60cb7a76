"""The fast path: options that change how a step is computed, not what it computes, and the one
batch loop (progress bar, memory format) that every pass over a loader goes through."""
import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm import tqdm


@dataclass(frozen=True)
class FastPath:
    """``amp``: bf16 autocast for the model's forward passes (attack steps included); losses, input
    gradients and the MI scores stay in fp32. ``channels_last``: NHWC batches and weights.
    ``compile``: torch.compile with ``compile_backend``. ``sync_bn``: SyncBatchNorm under torchrun."""
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    sync_bn: bool = False

    def autocast(self, device: torch.device):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def batches(self, loader, desc: Optional[str], progress: bool = True):
        """(x, y) of every batch of ``loader`` in the fast path's memory format, under a progress bar.

        Autocast stays with the caller: a training step's backward pass must run outside it."""
        for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
            yield self.batch(x), y
