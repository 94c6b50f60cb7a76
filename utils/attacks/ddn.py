"""DDN (Rony et al., "Decoupling Direction and Norm for Efficient Gradient-Based L2
Adversarial Attacks and Defenses", CVPR 2019), untargeted.

Each iteration takes a normalised gradient step of size α on δ (the direction), then
rescales δ to a norm ε_k that shrinks by (1 − γ) while x + δ is adversarial and grows by
(1 + γ) while it is not. A minimum-norm attack: the smallest adversarial example seen is
returned whatever its norm; the registry's ``robust_mask`` counts it only within ε."""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import attack_mode, draw, unwrap


def ddn(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int = 20,
    alpha: float = 0.01,
    alpha_init: float = 1.0,
    gamma: float = 0.05,
    init_norm: float = 1.0,
    levels: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """DDN-L2. Returns per sample the smallest-L2 misclassified example among the iterates,
    or ``x`` itself where none was misclassified.

    The step α is cosine-annealed from ``alpha_init`` down to ``alpha`` at the last
    iteration, as in DDN's own implementation; the paper's "step 0.01" is read as that final
    step (``alpha_init=alpha`` gives a constant step, which with 20 iterations barely turns
    δ away from its first gradient). ``levels``: quantise x + δ to that many grey levels each
    iteration, as the original offers (off by default: evaluation here is on continuous
    inputs). ``generator`` draws the random direction used where a gradient is exactly 0."""
    x = x.detach()
    net = unwrap(model)
    n = x.shape[0]
    flat = (n,) + (1,) * (x.dim() - 1)
    delta = torch.zeros_like(x)
    norm = torch.full((n,), float(init_norm), device=x.device, dtype=x.dtype)
    best_l2 = torch.full((n,), math.inf, device=x.device, dtype=x.dtype)
    best = x.clone()

    def keep_best(x_adv: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        nonlocal best, best_l2
        is_adv = logits.argmax(dim=1) != y
        l2 = (x_adv - x).flatten(1).norm(dim=1)
        better = is_adv & (l2 < best_l2)
        best_l2 = torch.where(better, l2, best_l2)
        best = torch.where(better.view(flat), x_adv, best)
        return is_adv

    with attack_mode(net):
        for i in range(steps):
            cosine = (1 + math.cos(math.pi * i / max(steps - 1, 1))) / 2
            step = alpha + (alpha_init - alpha) * cosine
            x_adv = (x + delta).requires_grad_(True)
            with torch.enable_grad():
                logits = net(x_adv).float()
                loss = F.cross_entropy(logits, y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_adv)
            with torch.no_grad():
                is_adv = keep_best(x_adv.detach(), logits)
                # A random direction where the gradient is exactly 0; drawn every step, so the
                # loop never waits on the device to ask whether one is needed.
                dead = grad.flatten(1).norm(dim=1) == 0
                grad = torch.where(dead.view(flat), draw(torch.randn, grad.shape, x, generator), grad)
                grad_norm = grad.flatten(1).norm(dim=1)
                delta = delta + step * grad / grad_norm.view(flat)
                norm = norm * torch.where(is_adv, 1 - gamma, 1 + gamma)
                delta = delta * (norm / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).view(flat)
                x_new = (x + delta).clamp(0.0, 1.0)
                if levels is not None:
                    x_new = torch.round(x_new * (levels - 1)) / (levels - 1)
                delta = x_new - x
        # The last update has not been looked at yet.
        with torch.no_grad():
            keep_best(x + delta, net(x + delta).float())
    return best.detach()
