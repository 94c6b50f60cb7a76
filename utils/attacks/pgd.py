"""Projected gradient descent (Madry et al., 2018): the one attack loop of the project.

Training (Standard AT, TRADES, MART, NAMID) and evaluation (PGD-k, L2 PGD-k) all call
:func:`pgd`; a norm and a loss are its only moving parts."""
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import ascent_direction, attack_mode, canonical_norm, draw, full_precision, project, unwrap
from .base import random_start as uniform_start

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# TRADES starts from a small Gaussian around x rather than a uniform draw from the ball.
TRADES_START_STD = 0.001


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # A sum, not a mean: each sample's input gradient must not shrink with the batch size.
    return F.cross_entropy(full_precision(logits), y, reduction="sum")


def _kl_to(p_nat: torch.Tensor) -> LossFn:
    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(full_precision(logits), dim=1), p_nat, reduction="sum")

    return loss


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epsilon: float,
    step_size: float,
    num_steps: int,
    norm: str = "linf",
    loss: Union[str, LossFn] = "ce",
    random_start: Union[bool, str] = True,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Maximise ``loss`` within the ε-ball of ``norm`` around ``x``, inside [0, 1].

    loss: ``"ce"`` (cross-entropy to the labels), ``"kl"`` (TRADES: KL divergence from the
    model's prediction on ``x``), or a callable ``(logits, y) -> scalar`` to ascend.
    random_start: ``True``/``"uniform"`` (uniform in the ball), ``"normal"`` (TRADES'
    0.001·N(0, I)) or ``False``.

    The model runs in eval mode with parameter gradients off, and both are restored after;
    gradients are taken with respect to the input only. Returns a detached tensor; ``x`` is
    never modified."""
    norm = canonical_norm(norm)
    x = x.detach()
    net = unwrap(model)
    with attack_mode(net):
        if loss == "ce":
            loss_fn = _ce
        elif loss == "kl":
            with torch.no_grad():
                loss_fn = _kl_to(F.softmax(full_precision(net(x)), dim=1))
        elif callable(loss):
            loss_fn = loss
        else:
            raise ValueError(f"unknown PGD loss {loss!r}; expected 'ce', 'kl' or a callable")

        if random_start is True or random_start == "uniform":
            delta = uniform_start(x, epsilon, norm, generator)
        elif random_start == "normal":
            delta = TRADES_START_STD * draw(torch.randn, x.shape, x, generator)
        elif random_start is False or random_start is None:
            delta = torch.zeros_like(x)
        else:
            raise ValueError(f"unknown random_start {random_start!r}")
        x_adv = (x + delta).clamp(0.0, 1.0)

        for _ in range(num_steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                objective = loss_fn(net(x_adv), y)
            (grad,) = torch.autograd.grad(objective, x_adv)
            x_adv = x_adv.detach() + step_size * ascent_direction(grad, norm)
            # Clamping after the projection never leaves the ball: it only moves pixels towards x.
            x_adv = (x + project(x_adv - x, epsilon, norm)).clamp(0.0, 1.0)
    return x_adv.detach()
