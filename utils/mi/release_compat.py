"""The release's numerics as an opt-in (PAPER.md §10).

The authors' code differs from the method as specified in a few places that change numbers.
The defaults follow the specification; each of these quirks has its own flag, so that its
effect can be measured alone, and ``--release-compat`` switches all of them on at once, to
run what the authors ran. Crashes and hard-coded devices of the release are not among them."""
from dataclasses import dataclass, fields
from typing import List, Sequence

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from utils.attacks.base import unwrap

# flag (without "--") -> what it switches back on
QUIRK_FLAGS = {
    "release-selection": "predictions for C, R and W by argmax of a softmax over the batch dimension "
                         "(PAPER.md §4: a bug; the default takes the argmax over classes)",
    "release-dv-mask": "DV bound: the positive pair stays in the logsumexp as a 0 (PAPER.md §3)",
    "release-nce-mask": "InfoNCE bound: each sample's own locations stay among the candidates at a score of -10",
    "release-batch-bounds": "JSD and InfoNCE bounds give every sample the batch mean, as the release's scalar "
                            "losses do (its cosine terms then carry no gradient)",
    "release-passes": "the release's forward passes, for its BatchNorm running statistics: the target 7 times "
                      "per stage-3 step, each local net once per loss term in stage 2 (slower)",
    "release-start": "the training attacks of stages 2 and 3 start at x + 0.001*N(0, I) instead of a uniform "
                     "draw from the ball",
}


@dataclass(frozen=True)
class Quirks:
    """Which of the release's quirks are on; all off is the specification."""

    selection: bool = False
    dv_mask: bool = False
    nce_mask: bool = False
    batch_bounds: bool = False
    passes: bool = False
    start: bool = False

    @classmethod
    def names(cls) -> List[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def release(cls) -> "Quirks":
        return cls(**{f.name: True for f in fields(cls)})


NONE = Quirks()


# Flags a run written before they existed did not record: it ran with each of them off.
QUIRK_DEFAULTS = {"release_compat": False, **{flag.replace("-", "_"): False for flag in QUIRK_FLAGS}}


# --------------------------------------------------------------------------- --release-passes

class BatchNormReplay:
    """Gives a module's BatchNorm running statistics the values the release's passes left.

    In train mode a BatchNorm layer normalises with the statistics of the batch itself, so
    the release's repeated forward passes gave the same outputs and gradients as one pass per
    input; only the running statistics (which eval mode uses later) moved once per pass.
    Construct this before a step's own passes; ``run(inputs)`` then restores the statistics
    and replays one gradient-free forward per input of the release's sequence, in its order.
    A network with dropout in front of a BatchNorm layer (not the release's) would have drawn
    other masks in each of the release's passes; the replay draws its own, and leaves the
    random-number streams as it found them."""

    def __init__(self, module: nn.Module):
        self.module = unwrap(module)  # no DDP buffer broadcast or gradient hooks for the replay
        self.saved = [(m, {k: b.clone() for k, b in m.named_buffers(recurse=False)})
                      for m in self.module.modules() if isinstance(m, _BatchNorm)]

    def run(self, inputs: Sequence[torch.Tensor]) -> None:
        for layer, buffers in self.saved:
            for name, value in buffers.items():
                # Through .data: the step's graph holds these buffers, and backward must not
                # see a version bump (train-mode BatchNorm does not read them in backward).
                getattr(layer, name).data.copy_(value)
        # No random number drawn here (dropout) may shift what the run draws next.
        devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            for x in inputs:
                self.module(x)


def release_stage3_passes(x: torch.Tensor, x_adv: torch.Tensor, w_nonempty: bool) -> List[torch.Tensor]:
    """The release's train-mode target passes in one stage-3 step, in order: x̃ for CE, x and x̃
    to select W, then, when W is not empty, one per MI term: x, x̃, x̃, x."""
    head = [x_adv, x, x_adv]
    return head + [x, x_adv, x_adv, x] if w_nonempty else head


def release_stage2_passes(n_correct: int, n_right: int, n_wrong: int) -> dict:
    """How often the release's stage 2 ran each estimator net per batch, and on what.

    E_n computes its R block, then its W block, each from the scores of (x, h(x)) twice and
    (x, h(x̃)) once; E_a its W block, then its R block, each from (n, h(x̃)) and (n, h(x)). With
    C empty each falls back to one term: (x, h(x)) for E_n and (n, h(x̃)) for E_a. Returns the
    global nets' inputs in order ("nat" for h(x), "adv" for h(x̃)); each local net runs once
    per global pass, on its own pattern (x or n)."""
    if n_correct == 0:
        return {"natural": ["nat"], "adversarial": ["adv"]}
    blocks = int(n_right > 0) + int(n_wrong > 0)
    return {"natural": ["nat", "nat", "adv"] * blocks, "adversarial": ["adv", "nat"] * blocks}
