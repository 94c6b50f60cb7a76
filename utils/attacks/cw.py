"""CW-L2 (Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", S&P 2017).

Minimises ‖δ‖₂² + c·f(x + δ) in tanh space with Adam, f the margin loss, and searches c
per sample by bisection. A minimum-norm attack: it returns the smallest successful example
it saw, of any norm, so counting it against a budget ε is the caller's job (the registry's
``robust_mask`` does it, as the paper evaluates CW within ε = 0.5)."""
import math

import torch
import torch.nn as nn

from .base import attack_mode, unwrap

# Keeps atanh finite for pixels at exactly 0 or 1.
TANH_CLIP = 1 - 1e-6
# The bisection's "no upper bound found yet" marker, as in the original.
NO_UPPER = 1e10


def margin_loss(logits: torch.Tensor, y: torch.Tensor, confidence: float = 0.0) -> torch.Tensor:
    """CW's f: max(Z_y − max_{i≠y} Z_i, −κ) per sample; ≤ 0 once the label is beaten by κ."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], -math.inf).amax(dim=1)
    return (true - other).clamp_min(-confidence)


def _succeeded(logits: torch.Tensor, y: torch.Tensor, confidence: float) -> torch.Tensor:
    # The original's test: raise the true logit by κ, then ask whether it still wins.
    boosted = logits.scatter_add(1, y[:, None], torch.full_like(logits[:, :1], confidence))
    return boosted.argmax(dim=1) != y


def cw_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int = 20,
    lr: float = 0.01,
    binary_search_steps: int = 5,
    initial_const: float = 0.1,
    confidence: float = 0.0,
) -> torch.Tensor:
    """CW-L2, untargeted. Returns per sample the smallest-L2 misclassified example found,
    or ``x`` itself where every constant failed.

    ``steps``/``lr``: Adam iterations and learning rate per constant (the paper: 20, 0.01).
    ``binary_search_steps``/``initial_const``: the search over c; each failure multiplies c
    by 10 until a success gives an upper bound, then c bisects. 5 steps from 0.1 reach
    c = 10³, enough on logits of ordinary scale, at 100 gradient evaluations in all;
    the original's 9 steps from 10⁻³ are a flag away."""
    x = x.detach()
    net = unwrap(model)
    n = x.shape[0]
    flat = (n,) + (1,) * (x.dim() - 1)
    w0 = torch.atanh((2 * x - 1).clamp(-TANH_CLIP, TANH_CLIP))
    const = torch.full((n,), float(initial_const), device=x.device, dtype=x.dtype)
    lower = torch.zeros_like(const)
    upper = torch.full_like(const, NO_UPPER)
    best_sq = torch.full_like(const, math.inf)
    best = x.clone()

    with attack_mode(net):
        for _ in range(binary_search_steps):
            # A fresh start and a fresh Adam state for every constant, as in the original.
            w = w0.clone().requires_grad_(True)
            optimizer = torch.optim.Adam([w], lr=lr)
            found = torch.zeros(n, dtype=torch.bool, device=x.device)
            for _ in range(steps):
                with torch.enable_grad():
                    x_adv = (torch.tanh(w) + 1) / 2
                    logits = net(x_adv).float()
                    sq = (x_adv - x).flatten(1).pow(2).sum(dim=1)
                    objective = (sq + const * margin_loss(logits, y, confidence)).sum()
                (grad,) = torch.autograd.grad(objective, w)
                with torch.no_grad():
                    success = _succeeded(logits, y, confidence)
                    found |= success
                    better = success & (sq < best_sq)
                    best_sq = torch.where(better, sq, best_sq)
                    best = torch.where(better.view(flat), x_adv, best)
                w.grad = grad
                optimizer.step()
            with torch.no_grad():
                upper = torch.where(found, torch.minimum(upper, const), upper)
                lower = torch.where(found, lower, torch.maximum(lower, const))
                bounded = upper < NO_UPPER
                const = torch.where(bounded, (lower + upper) / 2, const * 10)
    return best.detach()
