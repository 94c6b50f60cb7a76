"""What every attack shares: the model's mode during an attack, and L∞/L2 geometry."""
from contextlib import contextmanager

import torch
import torch.nn as nn

NORMS = ("linf", "l2")
# The release's spellings of the threat model.
NORM_ALIASES = {"l_inf": "linf", "linf": "linf", "Linf": "linf", "l_2": "l2", "l2": "l2", "L2": "l2"}


def canonical_norm(norm: str) -> str:
    try:
        return NORM_ALIASES[norm]
    except KeyError:
        raise ValueError(f"unknown norm {norm!r}; expected one of l_inf, l_2") from None


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 at least: bf16 autocast logits are upcast for the loss, float64 stays
    float64 (the pinned runs compute in float64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def unwrap(model: nn.Module) -> nn.Module:
    """The module an attack should call: the one behind DistributedDataParallel / DataParallel.

    A DDP forward would register gradient hooks for the parameters and synchronise buffers,
    neither of which an attack wants. A torch.compile wrapper is kept: it is the fast path."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def bare_module(model: nn.Module) -> nn.Module:
    """The plain module behind every wrapper (DDP, DataParallel, torch.compile): its state_dict
    has the keys a checkpoint should carry."""
    while True:
        model = unwrap(model)
        if not hasattr(model, "_orig_mod"):
            return model
        model = model._orig_mod


@contextmanager
def eval_mode(model: nn.Module, frozen: bool = False):
    """Eval mode for the block (BatchNorm running statistics, no dropout); with ``frozen``, no
    parameter gradients either.

    Each module's own mode (and each parameter's ``requires_grad``) is restored afterwards, so a
    model that was training goes on training, with parts its caller froze still frozen."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()] if frozen else []
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


def attack_mode(model: nn.Module):
    """How every attack holds the model: eval mode and no parameter gradients, both restored after
    (the attack's forward passes leave a training model's BatchNorm statistics untouched)."""
    return eval_mode(model, frozen=True)


def lp_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample norm of a perturbation batch, shape (N,)."""
    flat = delta.flatten(1)
    if canonical_norm(norm) == "linf":
        return flat.abs().amax(dim=1)
    return flat.norm(p=2, dim=1)


def project(delta: torch.Tensor, epsilon: float, norm: str) -> torch.Tensor:
    """Project each perturbation onto the ε-ball of the norm."""
    if canonical_norm(norm) == "linf":
        return delta.clamp(-epsilon, epsilon)
    norms = delta.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
    factor = (epsilon / norms).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.dim() - 1)))


def ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent direction of unit norm: sign for L∞, normalised gradient for L2."""
    if canonical_norm(norm) == "linf":
        return grad.sign()
    norms = grad.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
    return grad / norms.view(-1, *([1] * (grad.dim() - 1)))


def draw(sample, shape, like: torch.Tensor, generator=None) -> torch.Tensor:
    """``sample`` (torch.rand or torch.randn) of ``shape``, with ``like``'s dtype and device.

    The numbers come from ``generator`` on its own device and are then moved: a generator
    cannot draw on another device, and a CPU generator must serve CUDA inputs too."""
    device = generator.device if generator is not None else like.device
    return sample(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def random_start(x: torch.Tensor, epsilon: float, norm: str, generator=None) -> torch.Tensor:
    """A uniform draw from the ε-ball (L∞: the cube; L2: uniform in the ball)."""
    if canonical_norm(norm) == "linf":
        u = draw(torch.rand, x.shape, x, generator)
        return (2 * u - 1) * epsilon
    n = x[0].numel()
    d = draw(torch.randn, x.shape, x, generator)
    d = d / d.flatten(1).norm(p=2, dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
    r = draw(torch.rand, (x.shape[0],), x, generator) ** (1.0 / n)
    return d * (epsilon * r).view(-1, *([1] * (x.dim() - 1)))
