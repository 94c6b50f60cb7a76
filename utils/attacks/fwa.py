"""Wasserstein attacks of Wu, Wang & Yu, "Stronger and Faster Wasserstein Adversarial
Attacks", ICML 2020: projected gradient with the exact dual projection (``fwa_pgd``, the
release's "FWA") and Frank–Wolfe with the dual linear minimisation oracle (``fwa_fw``, the
attack the paper names).

The threat model, as here implemented:
- The adversarial image is moved mass: a transport plan Π[n, c, o, i, j] ≥ 0 sends mass from
  pixel (i, j) of channel c to pixel (i, j) + o, for the k×k offsets o of ``neighbourhood``.
  Each pixel sends exactly its own intensity (row sums of Π equal x), mass never leaves the
  image or its channel, and x' = Σ of the mass arriving at each pixel.
- The cost of moving one unit of mass by o is the Euclidean length ‖o‖₂ in pixels, and
  ⟨Π, C⟩ ≤ ε · Σ x per sample (all channels together): ε is the mean distance, in pixels, a
  unit of intensity may travel. That is Wu et al.'s normalisation (the cost bound scaled by
  the image's total mass) and so the release's radius 8/255.
- x' is clamped to [0, 1] for the model and at the end, which may shave some mass.
"""
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import attack_mode, unwrap


def neighbourhood(kernel_size: int) -> torch.Tensor:
    """The (k², 2) offsets (di, dj), each in −k//2 … (k − 1)//2, row-major.

    Symmetric for odd k; an even k (the release's 4) reaches one pixel further up/left."""
    r = torch.arange(kernel_size) - kernel_size // 2
    return torch.cartesian_prod(r, r)


def transport_cost(kernel_size: int) -> torch.Tensor:
    """Cost ‖o‖₂ of each offset, shape (k²,)."""
    return neighbourhood(kernel_size).double().norm(dim=1).float()


def valid_moves(kernel_size: int, height: int, width: int) -> torch.Tensor:
    """(k², H, W) bool: whether pixel (i, j) may send mass along offset o (stays in the image)."""
    o = neighbourhood(kernel_size)
    i = torch.arange(height)[None, :, None] + o[:, 0, None, None]
    j = torch.arange(width)[None, None, :] + o[:, 1, None, None]
    return (i >= 0) & (i < height) & (j >= 0) & (j < width)


def identity_plan(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The plan that moves nothing: all of each pixel's mass on the zero offset."""
    n, c, h, w = x.shape
    plan = x.new_zeros(n, c, kernel_size**2, h, w)
    plan[:, :, (kernel_size // 2) * kernel_size + kernel_size // 2] = x
    return plan


def plan_to_image(plan: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """x'[p] = Σ_o Π[p − o, o]: the mass arriving at each pixel (fold is unfold's adjoint)."""
    n, c, kk, h, w = plan.shape
    canvas = F.fold(plan.reshape(n, c * kk, h * w), (h + kernel_size - 1, w + kernel_size - 1), kernel_size)
    s = kernel_size // 2
    return canvas[..., s : s + h, s : s + w]


def plan_cost(plan: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """⟨Π, C⟩ per sample, shape (N,)."""
    return torch.einsum("nckhw,k->n", plan, cost.to(plan))


def _simplex_rows(v: torch.Tensor, mass: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row v[..., :] onto {π ≥ 0, Σπ = mass, π = 0 off ``valid``}.

    Sort-based (Held et al. 1974; Duchi et al. 2008). Invalid entries are pushed low
    enough to be zero in the answer without breaking the threshold of the valid ones."""
    low = v.detach().min() - mass.detach().max() - 1
    v = torch.where(valid, v, low)
    u = v.sort(dim=-1, descending=True).values
    cumulative = u.cumsum(dim=-1) - mass
    index = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    support = (u - cumulative / index > 0).sum(dim=-1, keepdim=True).clamp_min(1)
    tau = cumulative.gather(-1, support - 1) / support.to(v.dtype)
    return (v - tau).clamp_min(0) * valid


def project_plan(
    v: torch.Tensor,
    x: torch.Tensor,
    budget: torch.Tensor,
    kernel_size: int,
    dual_iters: int = 15,
) -> torch.Tensor:
    """Exact Euclidean projection of ``v`` (N, C, k², H, W) onto
    {Π ≥ 0, Σ_o Π[·, o, ·] = x, ⟨Π, C⟩ ≤ budget} (Wu et al.'s dual projection).

    For a multiplier λ ≥ 0 of the cost constraint the minimiser is the row-wise simplex
    projection of v − λC, whose cost φ(λ) is piecewise linear and non-increasing. The root
    of φ(λ) = budget is found by Newton steps (slope −Σ_rows |S|·Var_S(C) over each row's
    support S), safeguarded by bisection inside a bracket that starts at a λ where all mass
    stays home; within the right linear piece a Newton step is exact. ``dual_iters`` steps
    run (about 8 suffice in practice; stopping early would wait for the device to say so); a
    sample stops moving once it meets the budget to 1e-6 relative. A sample still over budget
    after ``dual_iters`` steps gets a feasible (no longer exact) mix of its iterate and the
    bracket's feasible end."""
    n = v.shape[0]
    h, w = v.shape[-2:]
    flat = (-1, 1, 1, 1, 1)
    cost = transport_cost(kernel_size).to(v)
    rows = v.movedim(2, -1)
    valid = valid_moves(kernel_size, h, w).to(v.device).movedim(0, -1)
    mass = x[..., None]
    k_cost = cost.view(1, 1, 1, 1, -1)

    def solve(lam: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        plan = _simplex_rows(rows - lam.view(flat) * k_cost, mass, valid)
        return plan, (plan * k_cost).flatten(1).sum(dim=1)

    def slope(plan: torch.Tensor) -> torch.Tensor:
        support = (plan > 0).to(plan)
        size = support.sum(dim=-1)
        first = (support * k_cost).sum(dim=-1)
        second = (support * k_cost**2).sum(dim=-1)
        return -(second - first**2 / size.clamp_min(1)).flatten(1).sum(dim=1)

    lam = torch.zeros(n, device=v.device, dtype=v.dtype)
    plan, spent = solve(lam)
    # No early exits below: asking whether every sample is done would wait for the device at each
    # step. A sample that is done keeps its λ, plan and cost, so running on changes no result.
    tol = 1e-6 * budget + 1e-12
    # Above this λ every row keeps all its mass at the zero offset (the cheapest move costs 1).
    home = rows[..., (kernel_size // 2) * kernel_size + kernel_size // 2]
    spread = (rows.masked_fill(~valid, -torch.inf).amax(dim=-1) - home).flatten(1).amax(dim=1)
    lo = torch.zeros_like(lam)
    hi = (spread.clamp_min(0) + x.flatten(1).amax(dim=1)) * 1.01 + 1e-12
    for _ in range(dual_iters):
        # Two-sided: a root met up to rounding must not send the bracket logic astray.
        done = (spent <= budget + tol) & ((lam == 0) | (spent >= budget - tol))
        over = spent > budget
        lo, hi = torch.where(over, lam, lo), torch.where(over, hi, lam)
        d = slope(plan)
        newton = lam - (spent - budget) / d.clamp_max(-1e-30)
        inside = (d < 0) & (newton > lo) & (newton < hi)
        step = torch.where(inside, newton, (lo + hi) / 2)
        lam = torch.where(done, lam, step)
        new_plan, new_spent = solve(lam)
        plan = torch.where(done.view(flat), plan, new_plan)
        spent = torch.where(done, spent, new_spent)
    # Out of steps: mix with the bracket's feasible end so that the cost is the budget.
    over = spent > budget + tol
    plan_hi, spent_hi = solve(torch.where(over, hi, lam))
    theta = ((budget - spent_hi) / (spent - spent_hi).clamp_min(1e-30)).clamp(0, 1).view(flat)
    plan = torch.where(over.view(flat), theta * plan + (1 - theta) * plan_hi, plan)
    return plan.movedim(-1, 2)


def linear_oracle(
    grad: torch.Tensor,
    x: torch.Tensor,
    budget: torch.Tensor,
    kernel_size: int,
    dual_iters: int = 15,
) -> torch.Tensor:
    """argmax of ⟨grad, S⟩ over the same set, through its dual (Frank–Wolfe's LMO).

    For a multiplier λ each row sends all its mass to the offset maximising grad − λC; the
    cost of that vertex only falls as λ grows. Bisection brackets the dual optimum λ* and
    the answer mixes the two bracketing vertices so that the cost is exactly the budget
    (both are optimal at λ*: the LP's solution lies on the segment between them)."""
    n = grad.shape[0]
    h, w = grad.shape[-2:]
    cost = transport_cost(kernel_size).to(grad)
    rows = grad.movedim(2, -1)
    valid = valid_moves(kernel_size, h, w).to(grad.device).movedim(0, -1)
    mass = x[..., None]
    k_cost = cost.view(1, 1, 1, 1, -1)
    flat = (-1, 1, 1, 1, 1)

    def vertex(lam: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        scores = (rows - lam.view(flat) * k_cost).masked_fill(~valid, -torch.inf)
        plan = F.one_hot(scores.argmax(dim=-1), rows.shape[-1]).to(grad) * mass
        return plan, (plan * k_cost).flatten(1).sum(dim=1)

    zero = torch.zeros(n, device=grad.device, dtype=grad.dtype)
    plan, spent = vertex(zero)
    active = spent > budget  # the others keep the unconstrained vertex (no early exit: a host sync)
    home = rows[..., (kernel_size // 2) * kernel_size + kernel_size // 2]
    spread = (rows.masked_fill(~valid, -torch.inf).amax(dim=-1) - home).flatten(1).amax(dim=1)
    # The margin keeps the home offset a strict winner at hi despite rounding.
    scale = rows.abs().flatten(1).amax(dim=1)
    lo, hi = zero, spread.clamp_min(0) * 1.01 + 1e-4 * scale + 1e-12
    for _ in range(dual_iters):
        mid = (lo + hi) / 2
        _, spent_mid = vertex(mid)
        over = spent_mid > budget
        lo, hi = torch.where(over, mid, lo), torch.where(over, hi, mid)
    plan_lo, spent_lo = vertex(lo)
    plan_hi, spent_hi = vertex(hi)
    theta = ((budget - spent_hi) / (spent_lo - spent_hi).clamp_min(1e-30)).clamp(0, 1).view(flat)
    mixed = theta * plan_lo + (1 - theta) * plan_hi
    return torch.where(active.view(flat), mixed, plan).movedim(-1, 2)


def _loss_grad(net: nn.Module, plan: torch.Tensor, y: torch.Tensor, kernel_size: int) -> torch.Tensor:
    plan = plan.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = net(plan_to_image(plan, kernel_size).clamp(0.0, 1.0)).float()
        loss = F.cross_entropy(logits, y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, plan)
    return grad


def _check(x: torch.Tensor, epsilon: float) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"Wasserstein attacks need images (N, C, H, W), got shape {tuple(x.shape)}")
    if x.min() < 0:
        raise ValueError("Wasserstein attacks move pixel intensity as mass: x must be non-negative")
    return epsilon * x.flatten(1).sum(dim=1)


def fwa_pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epsilon: float,
    steps: int = 40,
    lr: float = 0.007,
    kernel_size: int = 5,
    dual_iters: int = 15,
    return_plan: bool = False,
):
    """Projected gradient ascent on the plan (Wu et al.'s PGD with dual projection; the release's "FWA").

    Each step adds ``lr`` times the loss gradient scaled to unit max-magnitude per sample
    (Wu et al.'s normalisation) and projects exactly. Defaults are the release's (40 steps,
    lr 0.007, 15 dual iterations) except ``kernel_size``: 5, Wu et al.'s odd neighbourhood,
    where the release used 4 (``kernel_size=4`` reproduces it, see :func:`neighbourhood`).
    ``epsilon`` is the Wasserstein radius per unit of mass (module docstring)."""
    x = x.detach()
    budget = _check(x, epsilon)
    net = unwrap(model)
    flat = (-1, 1, 1, 1, 1)
    plan = identity_plan(x, kernel_size)
    with attack_mode(net):
        for _ in range(steps):
            grad = _loss_grad(net, plan, y, kernel_size)
            with torch.no_grad():
                scale = grad.abs().flatten(1).amax(dim=1).view(flat) + 1e-12
                plan = project_plan(plan + lr * grad / scale, x, budget, kernel_size, dual_iters)
    x_adv = plan_to_image(plan, kernel_size).clamp(0.0, 1.0).detach()
    return (x_adv, plan.detach()) if return_plan else x_adv


def fwa_fw(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epsilon: float,
    steps: int = 40,
    kernel_size: int = 5,
    dual_iters: int = 15,
    return_plan: bool = False,
):
    """Frank–Wolfe on the plan (Wu et al.): step 2/(t + 2) towards the exact LMO vertex.

    The LMO here solves the linear program exactly through its 1-D dual; Wu et al.'s code
    adds a small entropy term to it instead, which makes the dual smooth but moves the
    vertex off the LP's answer by that regulariser. ``epsilon`` as in :func:`fwa_pgd`."""
    x = x.detach()
    budget = _check(x, epsilon)
    net = unwrap(model)
    plan = identity_plan(x, kernel_size)
    with attack_mode(net):
        for t in range(steps):
            grad = _loss_grad(net, plan, y, kernel_size)
            with torch.no_grad():
                target = linear_oracle(grad, x, budget, kernel_size, dual_iters)
                gamma = 2.0 / (t + 2)
                plan = (1 - gamma) * plan + gamma * target
    x_adv = plan_to_image(plan, kernel_size).clamp(0.0, 1.0).detach()
    return (x_adv, plan.detach()) if return_plan else x_adv


def fwa(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, method: str = "fw",
        **options) -> torch.Tensor:
    """Dispatch: ``method="fw"`` (the paper's Frank–Wolfe) or ``"pgd"`` (the release's)."""
    attacks = {"fw": fwa_fw, "pgd": fwa_pgd}
    if method not in attacks:
        raise ValueError(f"unknown FWA method {method!r}; expected one of {sorted(attacks)}")
    return attacks[method](model, x, y, epsilon, **options)

