"""The evaluation suite (PAPER.md §7): CW, DDN, TI-DIM/MI-FGSM, FWA, AutoAttack and the registry.

A tiny MLP (with BatchNorm, so that eval mode matters) is trained once on synthetic
10-class 1×8×8 images; every attack must keep to its budget, leave its input and the
model's state alone, and actually lower the accuracy."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.attacks.autoattack import autoattack, build_autoattack
from utils.attacks.base import lp_norm
from utils.attacks.cw import cw_l2, margin_loss
from utils.attacks.ddn import ddn
from utils.attacks.fwa import (
    _simplex_rows,
    fwa_fw,
    fwa_pgd,
    identity_plan,
    linear_oracle,
    neighbourhood,
    plan_cost,
    plan_to_image,
    project_plan,
    transport_cost,
    valid_moves,
)
from utils.attacks.registry import GROUPS, build_attack, expand_attack_names, robust_mask
from utils.attacks.tidim import diverse_input, gaussian_kernel, mifgsm, smooth_gradient, tidim

N_CLASSES = 10


def _images(n: int, generator: torch.Generator):
    # Smooth class prototypes plus noise: learnable in a few hundred steps, yet close enough
    # for small budgets to flip decisions.
    protos = torch.rand(N_CLASSES, 1, 8, 8, generator=torch.Generator().manual_seed(123)) * 0.6 + 0.2
    protos = F.avg_pool2d(F.pad(protos, (1, 1, 1, 1), mode="replicate"), 3, 1)
    y = torch.randint(0, N_CLASSES, (n,), generator=generator)
    x = (protos[y] + 0.15 * torch.randn(n, 1, 8, 8, generator=generator)).clamp(0, 1)
    return x, y


@pytest.fixture(scope="module")
def tiny():
    g = torch.Generator().manual_seed(0)
    x_train, y_train = _images(2000, g)
    x_test, y_test = _images(32, g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, N_CLASSES))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        idx = torch.randint(0, len(x_train), (128,), generator=g)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        clean = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert clean >= 0.8, clean
    return model, x_test, y_test


# name, epsilon, options: budgets large enough for the tiny model to lose accuracy, steps
# cut down where the defaults would be slow.
CASES = [
    ("pgd10", 0.05, {}),
    ("l2-pgd10", 0.5, {}),
    ("aa", 0.05, {"version": "custom", "attacks_to_run": ["apgd-ce"], "n_iter": 10}),
    ("fwa10", 0.1, {}),
    ("fwa10", 0.1, {"method": "pgd", "lr": 0.05}),
    ("tidim", 0.05, {"steps": 10, "kernel_size": 5, "sigma": 1.0}),
    ("mifgsm", 0.05, {}),
    ("cw", 0.5, {"steps": 10, "binary_search_steps": 3}),
    ("ddn", 0.5, {}),
]


@pytest.mark.parametrize("name,epsilon,options", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_attack_keeps_budget_input_and_model_state(tiny, name, epsilon, options):
    model, x, y = tiny
    attack = build_attack(name, epsilon=epsilon, **options)
    model.train()
    frozen = model[1].weight
    frozen.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    stats = [b.clone() for b in model.buffers()]
    x_before = x.clone()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # AutoAttack's own trust checks
            x_adv = attack(model, x, y)
        assert model.training and all(m.training for m in model.modules())
        assert [p.requires_grad for p in model.parameters()] == flags
        assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))
    finally:
        frozen.requires_grad_(True)
        model.eval()
    assert torch.equal(x, x_before)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    if attack.budget != "wasserstein" and not attack.minimum_norm:
        assert (lp_norm(x_adv - x, attack.norm) <= epsilon + 1e-6).all()

    robust = robust_mask(model, x, y, x_adv, attack)
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    assert not (robust & ~clean).any()
    assert robust.float().mean() < clean.float().mean(), f"{name} did not lower the accuracy"


class _Halfspace(nn.Module):
    """Two classes split by a hyperplane at L2 distance ``margin`` from the all-0.5 image."""

    def __init__(self, margin: float):
        super().__init__()
        self.margin = margin

    def forward(self, x):
        w = torch.full(x.shape[1:], 1.0 / x[0].numel() ** 0.5)  # unit normal
        f = ((x - 0.5) * w).flatten(1).sum(1) + self.margin
        return torch.stack([f, -f], dim=1)


@pytest.mark.parametrize("eps", [0.15, 0.3])
def test_ddn_breaks_what_lies_within_a_small_epsilon(eps):
    """The boundary is 0.1 away: DDN must find it within ε. Started at norm 1, its 20
    iterations could not get below 1.05·0.95^19 ≈ 0.40 and would report every sample robust."""
    model, x = _Halfspace(0.1), torch.full((4, 1, 4, 4), 0.5)
    y = torch.zeros(4, dtype=torch.long)
    attack = build_attack("ddn", epsilon=eps)
    x_adv = attack(model, x, y)
    assert not robust_mask(model, x, y, x_adv, attack).any()
    assert not attack.epsilon_free and build_attack("cw").epsilon_free


def test_minimum_norm_attacks_count_only_within_epsilon(tiny):
    model, x, y = tiny
    with torch.no_grad():
        pred = model(x).argmax(1)
    # A "perfect" minimum-norm answer far outside ε: another class's image, misclassified.
    other = torch.roll(torch.arange(len(x)), 1)
    x_far = x[other]
    with torch.no_grad():
        far_wrong = model(x_far).argmax(1) != y
    far = (x_far - x).flatten(1).norm(dim=1) > 0.5
    case = (pred == y) & far_wrong & far
    assert case.sum() >= 3

    cw = build_attack("cw", epsilon=0.5)
    assert cw.minimum_norm
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # out of ε is expected of CW: no warning
        mask = robust_mask(model, x, y, x_far, cw)
    assert mask[case].all()
    assert not robust_mask(model, x, y, x_far, build_attack("ddn", epsilon=1e3))[case].any()

    # For a fixed-budget attack the same examples are a bug: warned about and not counted.
    with pytest.warns(UserWarning, match="outside"):
        mask = robust_mask(model, x, y, x_far, build_attack("l2-pgd40", epsilon=0.5))
    assert mask[case].all()


def test_cw_and_ddn_return_smallest_successful_or_input(tiny):
    model, x, y = tiny
    for x_adv in (cw_l2(model, x, y, steps=10, binary_search_steps=3), ddn(model, x, y)):
        with torch.no_grad():
            wrong = model(x_adv).argmax(1) != y
        unchanged = (x_adv == x).flatten(1).all(1)
        assert (wrong | unchanged).all()
        assert wrong.float().mean() > 0.5
        # Counted within a tiny ε, almost nothing breaks; within a huge one, all that was found does.
        l2 = (x_adv - x).flatten(1).norm(dim=1)
        attack = build_attack("ddn", epsilon=1e-3)
        assert robust_mask(model, x, y, x_adv, attack).sum() >= (wrong & (l2 > 1e-3 + 1e-6)).sum()


def test_cw_margin_loss():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0]])
    y = torch.tensor([0, 1])
    assert torch.allclose(margin_loss(logits, y), torch.tensor([2.0, -0.0]))
    assert torch.allclose(margin_loss(logits, y, confidence=10.0), torch.tensor([2.0, -3.0]))


def test_cw_returns_the_nearest_success_and_the_search_tightens_it():
    """_Halfspace at m = 0.1 from the all-0.5 image: the minimum-norm answer lies m away, along −w.

    c = 10 is far above what the boundary needs (the 1-D objective t² + 2c·(m − t)⁺ crosses it
    for c > m), so a single constant pulls at Adam's full speed, ≈ lr per coordinate in tanh
    space, hence at most ½·lr·√d = 0.02 = 0.2·m in L2 per step: its first success lies less
    than a step past the boundary. After it Adam's momentum overshoots far out, so the last
    success is much further than the smallest one, which is what must come back.
    Five constants run the same first constant (so they can only do as well) and then bisect
    c down (5, 2.5, 1.25, 0.625): weaker pulls whose steps shrink as the distance term grows
    near the boundary, and whose crossings fall elsewhere; the smallest of all is returned."""
    margin, lr, steps = 0.1, 0.01, 50
    model, x = _Halfspace(margin), torch.full((1, 1, 4, 4), 0.5)
    y = torch.zeros(1, dtype=torch.long)
    one_step_l2 = 0.5 * lr * x[0].numel() ** 0.5
    assert one_step_l2 == pytest.approx(0.2 * margin)

    results = {}
    for searches in (1, 5):
        x_adv = cw_l2(model, x, y, steps=steps, lr=lr, binary_search_steps=searches, initial_const=10.0)
        with torch.no_grad():
            assert (model(x_adv).argmax(1) != y).all(), searches
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        results[searches] = (x_adv - x).flatten(1).norm(dim=1).item()
    # One constant: the first crossing, not where the overshoot ended (two steps of slack for
    # Adam's step exceeding lr when the gradient's size changes).
    assert results[1] <= margin + 2 * one_step_l2
    # The search gets within 10 % of the true minimum, strictly closer than its first constant.
    assert results[5] <= 1.1 * margin
    assert results[5] < results[1]


def test_tidim_pieces():
    kernel = gaussian_kernel(15, 3.0)
    assert kernel.shape == (15, 15) and torch.isclose(kernel.sum(), torch.tensor(1.0))
    assert torch.equal(kernel, kernel.flip(0)) and torch.equal(kernel, kernel.T)
    assert kernel[7, 7] == kernel.max()
    grad = torch.zeros(1, 3, 8, 8)
    grad[0, 1, 4, 4] = 1.0
    smooth = smooth_gradient(grad, gaussian_kernel(5, 1.0))
    assert smooth.shape == grad.shape and smooth[0, 0].abs().sum() == 0 and smooth[0, 2].abs().sum() == 0
    assert torch.isclose(smooth.sum(), torch.tensor(1.0))

    x = torch.rand(4, 3, 8, 8)
    assert diverse_input(x, resize_max=8) is x  # the release's 32 → 32: no transformation
    g = torch.Generator().manual_seed(0)
    out = diverse_input(x, resize_max=12, probability=1.0, generator=g)
    assert out.shape == x.shape and not torch.equal(out, x)
    assert diverse_input(x, resize_max=12, probability=0.0) is x
    again = diverse_input(x, resize_max=12, probability=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


class _Bowl(nn.Module):
    """Two classes, logits (0, −½‖x − t‖²): the summed CE's input gradient is p₁·(t − x) for
    label 0 and p₀·(x − t) for label 1, so its L1-normalised form is ±(t − x)/‖t − x‖₁, known in
    closed form, and it turns as x moves (unlike a linear model's)."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.register_buffer("target", target)

    def forward(self, x):
        far = -0.5 * (x - self.target).pow(2).flatten(1).sum(1)
        return torch.stack([torch.zeros_like(far), far], dim=1)


def _bowl(seed: int):
    g = torch.Generator().manual_seed(seed)
    target = 0.3 + 0.4 * torch.rand(3, 8, 8, generator=g)
    x = 0.3 + 0.4 * torch.rand(4, 3, 8, 8, generator=g)  # the steps below never reach the box
    y = torch.tensor([0, 1, 1, 0])
    return _Bowl(target), x, y


def _direction(model, x, y):
    """The sign-relevant CE gradient of the bowl, up to a positive factor per sample (float64)."""
    toward = model.target.double() - x.double()
    return torch.where((y == 0).view(-1, 1, 1, 1), toward, -toward)


def _smooth(grad, size, sigma):
    """Depthwise zero-padded convolution with a normalised size × size Gaussian of width sigma px."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-offsets**2 / (2 * sigma**2))
    kernel = torch.outer(g, g) / torch.outer(g, g).sum()
    c = grad.shape[1]
    return F.conv2d(grad, kernel.expand(c, 1, size, size), padding=size // 2, groups=c)


def _l1_normalised(grad):
    return grad / grad.abs().flatten(1).sum(1).view(-1, *[1] * (grad.dim() - 1))


def _assert_sign_step(x_adv, start, step, direction):
    """x_adv = start + step·sign(direction), every coordinate, the direction clear of zero."""
    assert direction.abs().min() > 1e-5 * direction.abs().max()  # float32 rounding is ~1e-7 of it
    assert torch.allclose(x_adv.double(), start.double() + step * direction.sign(), atol=1e-6)


def test_mifgsm_steps_along_the_momentum_of_l1_normalised_gradients():
    """MI-FGSM: step 1 is ε/T·sign(g₁), step 2 ε/T·sign(μ·g₁/‖g₁‖₁ + g₂/‖g₂‖₁), μ = 1."""
    model, x, y = _bowl(seed=0)
    epsilon, steps = 0.1, 2
    step = epsilon / steps  # MI-FGSM's default step
    g1 = _direction(model, x, y)
    one = mifgsm(model, x, y, epsilon, steps=1, step_size=step)
    _assert_sign_step(one, x, step, g1)

    g2 = _direction(model, one, y)
    momentum = 1.0 * _l1_normalised(g1) + _l1_normalised(g2)
    # The setting tells the rules apart: without the momentum, or without the normalisation,
    # some coordinates would step the other way.
    assert (momentum.sign() != g2.sign()).any()
    assert (momentum.sign() != (g1 + g2).sign()).any()
    two = mifgsm(model, x, y, epsilon, steps=steps)
    _assert_sign_step(two, one, step, momentum)
    assert (two - x).abs().max() <= epsilon + 1e-6


def test_tidim_steps_along_the_smoothed_gradient_with_momentum():
    """TI-DIM with DI off (resize_max = H): each gradient is smoothed per channel, then
    normalised and accumulated, so step 1 is α·sign(K ∗ g₁) and step 2 α·sign(μ·m₁ + ĝ₂)."""
    model, x, y = _bowl(seed=1)
    step, decay, size, sigma = 0.03, 0.5, 5, 1.0
    options = dict(step_size=step, decay=decay, kernel_size=size, sigma=sigma, resize_max=8)
    g1 = _smooth(_direction(model, x, y), size, sigma)
    assert (g1.sign() != _direction(model, x, y).sign()).any()  # the smoothing matters here
    one = tidim(model, x, y, 0.1, steps=1, **options)
    _assert_sign_step(one, x, step, g1)

    g2 = _smooth(_direction(model, one, y), size, sigma)
    momentum = decay * _l1_normalised(g1) + _l1_normalised(g2)
    assert (momentum.sign() != g2.sign()).any()
    two = tidim(model, x, y, 0.1, steps=2, **options)
    _assert_sign_step(two, one, step, momentum)


def test_tidim_feeds_every_step_through_diverse_input(monkeypatch):
    """DI transforms the input of every step, with resize_max = round(1.1·H) unless given, and
    what the model reads is DI's output; MI-FGSM has no DI."""
    import utils.attacks.tidim as tidim_module

    calls, fed = [], []

    def spy(x_in, resize_max, probability=0.5, generator=None):
        out = diverse_input(x_in, resize_max, probability, generator)
        calls.append((x_in.detach().clone(), resize_max, probability, out))
        return out

    monkeypatch.setattr(tidim_module, "diverse_input", spy)
    model, x, y = _bowl(seed=2)
    model.register_forward_pre_hook(lambda module, inputs: fed.append(inputs[0]))

    build_attack("tidim", epsilon=0.05, steps=3, kernel_size=3)(model, x, y)
    assert [c[1:3] for c in calls] == [(round(1.1 * 8), 0.5)] * 3 == [(9, 0.5)] * 3
    assert torch.equal(calls[0][0], x)  # the first step reads x itself
    assert not torch.equal(calls[1][0], x)  # later ones the current iterate
    assert len(fed) == 3 and all(seen is c[3] for seen, c in zip(fed, calls))

    calls.clear()
    tidim(model, x, y, 0.05, steps=2, resize_max=12, diversity_prob=1.0)
    assert [c[1:3] for c in calls] == [(12, 1.0)] * 2
    calls.clear()
    mifgsm(model, x, y, 0.05, steps=2)
    assert calls == []


# --- FWA -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel_size", [3, 4, 5])
def test_plan_to_image_moves_mass_along_offsets(kernel_size):
    plan = torch.rand(2, 3, kernel_size**2, 6, 7) * valid_moves(kernel_size, 6, 7)
    expected = torch.zeros(2, 3, 6, 7)
    for o, (di, dj) in enumerate(neighbourhood(kernel_size).tolist()):
        for i in range(6):
            for j in range(7):
                if 0 <= i + di < 6 and 0 <= j + dj < 7:
                    expected[:, :, i + di, j + dj] += plan[:, :, o, i, j]
    assert torch.allclose(plan_to_image(plan, kernel_size), expected, atol=1e-6)
    x = torch.rand(2, 3, 6, 7)
    assert torch.equal(plan_to_image(identity_plan(x, kernel_size), kernel_size), x)
    assert transport_cost(kernel_size).min() == 0


def _dykstra(v, x, budget, kernel_size, iters=4000):
    """Projection onto the intersection by Dykstra's alternating projections: an algorithm
    independent of the dual one under test."""
    moves = valid_moves(kernel_size, *x.shape[-2:])
    valid = moves.movedim(0, -1)
    # The cost's normal restricted to allowed moves: the same intersection, faster convergence.
    cost = transport_cost(kernel_size).to(v).view(1, 1, -1, 1, 1) * moves
    cost = cost.expand_as(v)

    def rows(z):
        return _simplex_rows(z.movedim(2, -1), x[..., None], valid).movedim(-1, 2)

    def halfspace(z):
        over = ((z * cost).flatten(1).sum(1) - budget).clamp_min(0)
        return z - (over / cost.flatten(1).pow(2).sum(1)).view(-1, 1, 1, 1, 1) * cost

    z, p, q = v.clone(), torch.zeros_like(v), torch.zeros_like(v)
    for _ in range(iters):
        a = rows(z + p)
        p = z + p - a
        z = halfspace(a + q)
        q = a + q - z
    return rows(z)


@pytest.mark.parametrize("kernel_size", [3, 4])
def test_project_plan_is_the_closest_feasible_plan(kernel_size):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 2, 4, 5, generator=g, dtype=torch.float64)
    x[2] = 0.0  # an all-black image has nothing to move
    budget = 0.05 * x.flatten(1).sum(1)
    v = identity_plan(x, kernel_size) + 0.3 * torch.randn(3, 2, kernel_size**2, 4, 5, generator=g,
                                                          dtype=torch.float64)
    plan = project_plan(v, x, budget, kernel_size)
    cost = transport_cost(kernel_size)
    assert plan.min() >= 0
    assert torch.allclose(plan.sum(2), x, atol=1e-12)
    assert (plan * ~valid_moves(kernel_size, 4, 5)).abs().max() == 0
    assert (plan_cost(plan, cost) <= budget * (1 + 1e-6) + 1e-12).all()
    assert torch.allclose(plan, _dykstra(v, x, budget, kernel_size), atol=1e-6)

    # Inactive budget: the plain row-wise projection, cost left below the budget.
    loose = project_plan(v, x, budget * 1e3, kernel_size)
    assert torch.allclose(loose, project_plan(v, x, torch.full_like(budget, 1e9), kernel_size))
    # Float32, default dual_iters: still feasible and close.
    plan32 = project_plan(v.float(), x.float(), budget.float(), kernel_size)
    assert (plan_cost(plan32, cost) <= budget.float() * (1 + 1e-5) + 1e-6).all()
    assert torch.allclose(plan32.double(), plan, atol=1e-4)


def test_linear_oracle_solves_the_linear_program():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    import numpy as np

    k, h, w = 3, 4, 4
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 1, h, w, generator=g, dtype=torch.float64)
    budget = 0.05 * x.flatten(1).sum(1)
    grad = torch.randn(2, 1, k * k, h, w, generator=g, dtype=torch.float64)
    vertex = linear_oracle(grad, x, budget, k, dual_iters=30)
    cost = transport_cost(k).double()
    valid = valid_moves(k, h, w)
    assert vertex.min() >= 0 and torch.allclose(vertex.sum(2), x)
    assert (plan_cost(vertex, cost) <= budget * (1 + 1e-9)).all()
    n = k * k * h * w
    rows = np.zeros((h * w, n))
    for o in range(k * k):
        rows[np.arange(h * w), o * h * w + np.arange(h * w)] = 1
    c_full = cost.view(-1, 1, 1).expand(k * k, h, w).flatten().numpy()
    bounds = [(0, None) if ok else (0, 0) for ok in valid.flatten().tolist()]
    for i in range(2):
        lp = scipy_optimize.linprog(-grad[i].flatten().numpy(), A_ub=c_full[None], b_ub=[budget[i].item()],
                                    A_eq=rows, b_eq=x[i].flatten().numpy(), bounds=bounds)
        assert lp.success
        assert abs((vertex[i] * grad[i]).sum().item() - (-lp.fun)) < 1e-6


@pytest.mark.parametrize("attack", [fwa_fw, fwa_pgd])
def test_fwa_plan_keeps_mass_and_transport_budget(tiny, attack):
    model, x, y = tiny
    epsilon = 0.1
    options = {"lr": 0.1} if attack is fwa_pgd else {}  # the release's 0.007 needs its 40 steps
    x_adv, plan = attack(model, x, y, epsilon, steps=5, return_plan=True, **options)
    budget = epsilon * x.flatten(1).sum(1)
    assert plan.min() >= 0
    assert torch.allclose(plan.sum(2), x, atol=1e-5)  # each pixel sends exactly its own mass
    assert (plan_cost(plan, transport_cost(5)) <= budget * (1 + 1e-5)).all()
    moved = plan_to_image(plan, 5)
    assert torch.allclose(moved.flatten(1).sum(1), x.flatten(1).sum(1), rtol=1e-5)  # mass conserved
    assert torch.equal(x_adv, moved.clamp(0, 1))
    assert (plan_cost(plan, transport_cost(5)) > 0.5 * budget).all()  # the budget is actually used


def test_fwa_rejects_non_images(tiny):
    model, x, y = tiny
    with pytest.raises(ValueError, match="images"):
        fwa_fw(model, x.flatten(1), y, 0.1)


# --- AutoAttack ------------------------------------------------------------------------------


def test_autoattack_matches_a_direct_call(tiny):
    from pyautoattack import AutoAttack

    model, x, y = tiny
    x, y = x[:12], y[:12]
    epsilon = 0.04
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = autoattack(model, x, y, epsilon, version="standard", seed=0)
        model.eval()
        direct = AutoAttack(model, norm="Linf", eps=epsilon, version="standard", seed=0, device=x.device)
        direct.verbose = False
        theirs, _ = direct.run_standard_evaluation(x, y, batch_size=500)
    assert torch.equal(ours, theirs)
    attack = build_attack("aa", epsilon=epsilon)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean()
        direct_acc = (model(theirs).argmax(1) == y).float().mean()
    acc = robust_mask(model, x, y, ours, attack).float().mean()
    assert acc == direct_acc and acc < clean


def test_autoattack_versions():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, N_CLASSES))
    release = build_autoattack(model, 8 / 255, version="release")
    assert release.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    # The same as if APGD had been built with 40 iterations.
    from pyautoattack.autopgd_base import APGDAttack

    fresh = APGDAttack(model, n_iter=40, eps=8 / 255)
    for apgd in (release.apgd, release.apgd_targeted):
        for attr in ("n_iter", "n_iter_orig", "n_iter_2", "n_iter_min", "size_decr"):
            assert getattr(apgd, attr) == getattr(fresh, attr)
    assert release.fab.n_iter == 40 and release.square.n_queries == 5000
    standard = build_autoattack(model, 8 / 255)
    assert standard.apgd.n_iter == 100 and standard.fab.n_iter == 100
    custom = build_autoattack(model, 0.5, norm="l2", version="custom", attacks_to_run=["apgd-ce"], n_queries=10)
    assert custom.attacks_to_run == ["apgd-ce"] and custom.norm == "L2" and custom.square.n_queries == 10
    with pytest.raises(ValueError, match="custom"):
        build_autoattack(model, 0.1, version="custom")
    with pytest.raises(ValueError, match="only read"):
        build_autoattack(model, 0.1, attacks_to_run=["apgd-ce"])
    with pytest.raises(ValueError, match="unknown AutoAttack version"):
        build_autoattack(model, 0.1, version="fast")


def test_autoattack_reads_float32_logits_under_bf16_autocast(monkeypatch):
    """A bf16-autocast forward gives bf16 logits; AutoAttack must be handed fp32 ones."""
    import utils.attacks.autoattack as aa_module

    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bare = net(x)
        wrapped = aa_module._Float32Logits(net)(x)
    assert bare.dtype == torch.bfloat16  # the premise: autocast does lower the model's logits
    assert wrapped.dtype == torch.float32 and torch.equal(wrapped, bare.float())

    seen = []

    class Adversary:
        def __init__(self, model):
            self.model = model

        def run_standard_evaluation(self, xb, yb, batch_size):
            seen.append(self.model(xb).dtype)
            return xb.clone(), yb

    monkeypatch.setattr(aa_module, "build_autoattack", lambda model, *args, **kwargs: Adversary(model))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = aa_module.autoattack(net, x, y, 0.1)
    assert seen == [torch.float32] and torch.equal(x_adv, x)


# --- registry --------------------------------------------------------------------------------


def test_expand_attack_names():
    assert expand_attack_names("pgd40,all-l2") == ["pgd40", "l2-pgd40", "cw", "ddn"]
    assert expand_attack_names("all-linf") == ["pgd40", "aa", "fwa40", "tidim"]
    assert expand_attack_names(" PGD7 , pgd7,all-l2,cw ") == ["pgd7", "l2-pgd40", "cw", "ddn"]
    assert expand_attack_names(["fwa3", "mifgsm"]) == ["fwa3", "mifgsm"]
    everything = expand_attack_names("all")
    assert everything == list(GROUPS["all-linf"] + GROUPS["all-l2"]) + ["mifgsm"]
    for bad in ("pgd", "pgd0", "fgsm", "l2-aa", "pgd40,bogus"):
        with pytest.raises(ValueError) as err:
            expand_attack_names(bad)
        assert "valid names" in str(err.value) and "pgdK" in str(err.value)
    with pytest.raises(ValueError, match="'bogus'"):
        expand_attack_names("pgd40,bogus")


def test_build_attack_metadata_and_options():
    expected = {
        "pgd40": ("linf", 8 / 255, False, "linf"),
        "aa": ("linf", 8 / 255, False, "linf"),
        "fwa40": ("linf", 8 / 255, False, "wasserstein"),
        "tidim": ("linf", 8 / 255, False, "linf"),
        "mifgsm": ("linf", 8 / 255, False, "linf"),
        "l2-pgd40": ("l2", 0.5, False, "l2"),
        "cw": ("l2", 0.5, True, "l2"),
        "ddn": ("l2", 0.5, True, "l2"),
    }
    for name in expand_attack_names("all"):
        attack = build_attack(name)
        assert (attack.norm, attack.epsilon, attack.minimum_norm, attack.budget) == expected[name]
        assert attack.name == name
    assert build_attack("PGD10", epsilon=0.1).epsilon == 0.1
    assert build_attack("cw", norm_default_eps={"linf": 0.1, "l2": 1.0}).epsilon == 1.0
    assert build_attack("aa", norm="l2").norm == "l2"
    with pytest.raises(ValueError, match="takes no option"):
        build_attack("pgd40", stepsize=0.1)
    with pytest.raises(ValueError, match="takes no option"):
        build_attack("cw", epsilon=0.5, kappa=1.0)
    with pytest.raises(ValueError, match="FWA method"):
        build_attack("fwa40", method="sinkhorn")
    with pytest.raises(ValueError, match="unknown attack"):
        build_attack("deepfool")


def test_pgd_entry_uses_quarter_epsilon_steps(tiny):
    model, x, y = tiny
    one_step = build_attack("pgd1", epsilon=0.08, random_start=False)
    x_adv = one_step(model, x, y)
    step = (x_adv - x).abs().flatten(1).amax(1)
    # Every sample moves (a trained MLP has no all-zero input gradient), by exactly ε/4.
    assert (step > 0).all()
    assert torch.allclose(step, torch.tensor(0.02), atol=1e-6)
    l2 = build_attack("l2-pgd1", epsilon=0.8, random_start=False)(model, x, y)
    assert torch.allclose((l2 - x).flatten(1).norm(dim=1), torch.tensor(0.2), atol=1e-2)


def test_robust_mask_never_exceeds_clean_accuracy(tiny):
    model, x, y = tiny
    wrong_labels = (y + 1) % N_CLASSES
    attack = build_attack("pgd40", epsilon=0.03)
    # Unchanged inputs under wrong labels: nothing is robust, and nothing is out of budget.
    assert not robust_mask(model, x, wrong_labels, x.clone(), attack).any()
    # Out of [0, 1] counts as not broken, with a warning.
    with pytest.warns(UserWarning):
        mask = robust_mask(model, x, y, x + 2.0, build_attack("fwa40"))
    with torch.no_grad():
        assert torch.equal(mask, model(x).argmax(1) == y)


def test_fwa_defaults_are_the_release_projected_variant(monkeypatch):
    import utils.attacks.registry as registry

    seen = {}

    def spy(name):
        def fn(model, x, y, epsilon, steps=40, kernel_size=5, dual_iters=15, return_plan=False):
            seen[name] = (steps, kernel_size)
            return x
        return fn

    monkeypatch.setattr(registry, "fwa_pgd", spy("pgd"))
    monkeypatch.setattr(registry, "fwa_fw", spy("fw"))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    x, y = torch.rand(2, 1, 2, 2), torch.zeros(2, dtype=torch.long)
    registry.build_attack("fwa40")(model, x, y)
    registry.build_attack("fwa-fw40")(model, x, y)
    assert seen["pgd"] == (40, 4)  # the release's kernel
    assert seen["fw"] == (40, 5)
    assert expand_attack_names("fwa-fw7") == ["fwa-fw7"]
