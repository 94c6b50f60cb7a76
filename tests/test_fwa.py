"""The Wasserstein attack FWA (utils/attacks/fwa.py): transport plans, their projection and the
linear oracle, and the two attacks built on them."""
import pytest
import torch

from tests.attack_helpers import train_tiny
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
from utils.host_syncs import HostSyncs


@pytest.fixture(scope="module")
def tiny():
    return train_tiny()


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


def test_projection_and_oracle_run_their_steps_without_a_host_sync():
    """No early exit that would wait for the device; a sample that has met its budget stays put,
    so more dual steps change nothing once every sample has converged."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 1, 5, 5, generator=g, dtype=torch.float64)
    budget = 0.05 * x.flatten(1).sum(1)
    budget[0] = 1e9  # inactive for one sample, active for the others
    v = identity_plan(x, 3) + 0.3 * torch.randn(4, 1, 9, 5, 5, generator=g, dtype=torch.float64)
    with HostSyncs() as syncs:
        plan = project_plan(v, x, budget, 3, dual_iters=15)
        vertex = linear_oracle(v, x, budget, 3, dual_iters=15)
    assert syncs.total == 0, syncs.calls
    assert torch.equal(project_plan(v, x, budget, 3, dual_iters=40), plan)
    alone = _simplex_rows(v.movedim(2, -1), x[..., None], valid_moves(3, 5, 5).movedim(0, -1)).movedim(-1, 2)
    assert torch.equal(plan[0], alone[0])
    assert (plan_cost(vertex, transport_cost(3)) <= budget * (1 + 1e-9)).all()


@pytest.mark.parametrize("attack", [fwa_fw, fwa_pgd])
def test_fwa_steps_read_nothing_back_to_the_host(tiny, attack):
    model, x, y = tiny
    counts = []
    for steps in (1, 3):
        with HostSyncs() as syncs:
            attack(model, x, y, 0.1, steps=steps)
        counts.append(syncs.calls)
    assert counts[0] == counts[1] and sum(counts[0].values()) <= 1, counts  # only the input check, once


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
