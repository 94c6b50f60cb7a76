import functools
import math

import pytest
import torch
import torch.nn as nn

from models.estimator import GlobalEncoder, LocalEncoder
from utils.mi.bounds import MI_MODES, mi_per_sample, resolve_mode, scores

# ---------------------------------------------------------------------------------------------
# Known-MI problem: x, y ∈ R^D, y = ρx + sqrt(1 − ρ²)ε per dimension; I(x; y) = −(D/2)·log(1 − ρ²).
D = 2
BATCH = 128


def _true_mi(rho: float) -> float:
    return -D / 2 * math.log(1 - rho**2)


def _pairs(n: int, rho: float, gen: torch.Generator):
    x = torch.randn(n, D, generator=gen)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, D, generator=gen)
    return x, y


def _mlp(hidden: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(D, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, hidden))


@functools.cache
def _trained_estimate(mode: str, rho: float, steps: int = 400) -> float:
    """Train a separable critic <g(x), f(y)> through mi_per_sample, then estimate on fresh pairs."""
    return _train_and_estimate(mode, rho, steps)


def _train_and_estimate(mode: str, rho: float, steps: int) -> float:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    f, g = _mlp(), _mlp()
    opt = torch.optim.Adam([*f.parameters(), *g.parameters()], lr=3e-3)
    for _ in range(steps):
        x, y = _pairs(BATCH, rho, gen)
        loss = -mi_per_sample(f(y).unsqueeze(-1), g(x), mode).mean()  # NCE: the objective, no constant
        opt.zero_grad()
        loss.backward()
        opt.step()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        ests = [mi_per_sample(f(y).unsqueeze(-1), g(x), mode, estimate=True).mean() for x, y in
                (_pairs(BATCH, rho, gen) for _ in range(20))]
    return float(torch.stack(ests).mean())


@pytest.mark.parametrize("mode", ["dv", "nce"])
def test_known_mi_close_to_truth_and_not_above(mode):
    true = _true_mi(0.8)  # ≈ 1.02 nats
    est = _trained_estimate(mode, 0.8)
    assert abs(est - true) < 0.15, (est, true)
    # DV over a finite batch is biased slightly upwards; anything beyond noise would be a bug.
    assert est < true + 0.1, (est, true)


@pytest.mark.parametrize("mode", MI_MODES)
def test_estimate_increases_with_correlation(mode):
    ests = [_trained_estimate(mode, rho) for rho in (0.2, 0.5, 0.8)]
    assert ests[0] < ests[1] < ests[2], ests


def test_nce_bounded_by_log_candidates():
    assert _trained_estimate("nce", 0.8) <= math.log(BATCH)
    n, length = 6, 4
    # u[i, i, l] = 10 and u[i, j, l] = 0: the bound is approached but never exceeded.
    local = 10 * torch.eye(n).unsqueeze(-1).expand(n, n, length)
    global_ = torch.eye(n)
    est = mi_per_sample(local, global_, "nce", estimate=True)
    assert (est <= math.log(1 + (n - 1) * length) + 1e-5).all()
    assert est.min() > math.log(1 + (n - 1) * length) - 1e-3


def test_nce_objective_is_a_log_probability_and_estimate_adds_log_candidates():
    """PAPER.md §3: the per-sample NCE value is the mean log-probability; log(#candidates) is
    added only when the value is reported as MI (the losses' cosines would change with it)."""
    n, length = 7, 5
    local, global_ = torch.randn(n, 3, length), torch.randn(n, 3)
    objective = mi_per_sample(local, global_, "nce")
    assert (objective <= 0).all()
    torch.testing.assert_close(mi_per_sample(local, global_, "nce", estimate=True),
                               objective + math.log(1 + (n - 1) * length))
    for mode in ("dv", "jsd"):
        torch.testing.assert_close(mi_per_sample(local, global_, mode, estimate=True),
                                   mi_per_sample(local, global_, mode))


# ---------------------------------------------------------------------------------------------
# Reference loops, one sample / location at a time, straight from PAPER.md §3.
def _loop_reference(local: torch.Tensor, global_: torch.Tensor, mode: str) -> torch.Tensor:
    n, _, length = local.shape
    out = []
    for i in range(n):
        u = [[float(global_[i] @ local[j, :, l]) for l in range(length)] for j in range(n)]
        if mode == "dv":
            vals = []
            for l in range(length):
                negs = [math.exp(u[j][l]) for j in range(n) if j != i]
                vals.append(u[i][l] - (math.log(sum(negs)) - math.log(n - 1)))
            out.append(sum(vals) / length)
        elif mode == "jsd":
            sp = lambda t: math.log1p(math.exp(t))  # noqa: E731
            pos = sum(math.log(2) - sp(-u[i][l]) for l in range(length)) / length
            neg = sum(sp(-u[j][l]) + u[j][l] - math.log(2)
                      for j in range(n) if j != i for l in range(length)) / ((n - 1) * length)
            out.append(pos - neg)
        else:
            negs = [math.exp(u[j][l2]) for j in range(n) if j != i for l2 in range(length)]
            vals = [u[i][l] - math.log(math.exp(u[i][l]) + sum(negs)) for l in range(length)]
            out.append(sum(vals) / length)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("mode", MI_MODES)
def test_matches_loop_reference(mode):
    local = torch.randn(5, 3, 4, dtype=torch.float64)
    global_ = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(mi_per_sample(local, global_, mode), _loop_reference(local, global_, mode))


def test_dv_excludes_the_positive():
    # Identical negatives everywhere: logsumexp over j≠i minus log(N−1) is exactly that score.
    n = 4
    u = torch.full((n, n, 1), 2.0)
    u[torch.arange(n), torch.arange(n)] = 7.0
    # Realise u as <global_i, local_j>: global one-hot-ish, local carrying the scores.
    global_ = torch.eye(n)
    local = u.permute(1, 0, 2).clone()  # local[j, i, 0] = u[i, j, 0]
    torch.testing.assert_close(scores(local, global_), u)
    torch.testing.assert_close(mi_per_sample(local, global_, "dv"), torch.full((n,), 5.0))
    # A positive left in the logsumexp as 0 (the release's masking) would not give 5.
    leaked = 7.0 - (math.log(3 * math.exp(2.0) + 1.0) - math.log(n - 1))
    assert abs(leaked - 5.0) > 1e-3


@pytest.mark.parametrize("mode", MI_MODES)
def test_shapes_both_layouts(mode):
    n, h = 6, 8
    local4 = torch.randn(n, h, 3, 2)
    global4 = torch.randn(n, h, 1, 1)
    a = mi_per_sample(local4, global4, mode)
    b = mi_per_sample(local4.flatten(2), global4.flatten(1), mode)
    assert a.shape == (n,)
    torch.testing.assert_close(a, b)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError):
        mi_per_sample(torch.randn(4, 8, 3), torch.randn(4, 7))
    with pytest.raises(ValueError):
        mi_per_sample(torch.randn(4, 8, 3), torch.randn(4, 8), mode="kl")


@pytest.mark.parametrize("mode", MI_MODES)
def test_gradient_reaches_global_not_image(mode):
    local_net, global_net = LocalEncoder(1, hidden=16), GlobalEncoder(10, hidden=16)
    image = torch.rand(4, 1, 28, 28, requires_grad=True)
    logits = torch.randn(4, 10, requires_grad=True)
    mi_per_sample(local_net(image), global_net(logits), mode).mean().backward()
    assert image.grad is None
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert all(p.grad is not None for p in local_net.parameters())


@pytest.mark.parametrize("mode", MI_MODES)
def test_stable_for_huge_scores(mode):
    local = torch.randn(8, 4, 3, requires_grad=True)
    global_ = (torch.randn(8, 4) * 1e4).requires_grad_()
    assert scores(local, global_).abs().max() > 1e3
    est = mi_per_sample(local, global_, mode)
    est.sum().backward()
    assert torch.isfinite(est).all()
    assert torch.isfinite(local.grad).all() and torch.isfinite(global_.grad).all()


@pytest.mark.parametrize("mode", MI_MODES)
def test_single_sample_gives_zero(mode):
    local = torch.randn(1, 4, 3, requires_grad=True)
    global_ = torch.randn(1, 4, requires_grad=True)
    est = mi_per_sample(local, global_, mode)
    assert est.shape == (1,) and est.item() == 0.0
    est.sum().backward()  # still attached to the graph
    assert torch.isfinite(global_.grad).all()


def test_resolve_mode():
    assert resolve_mode("dv") == "dv"
    assert resolve_mode("nce") == "nce"
    assert resolve_mode("fd", "JSD") == "jsd"
    assert resolve_mode("jsd") == "jsd"
    with pytest.raises(ValueError, match="--va-fd-measure"):
        resolve_mode("fd", "KL")
    with pytest.raises(ValueError, match="--va-mode"):
        resolve_mode("mine")


# ---------------------------------------------------------------------------------------------
# The release's bounds (--release-dv-mask, --release-nce-mask, --release-batch-bounds; PAPER.md §10)

def _random_features(n=6, h=5, loc=4, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, h, loc, generator=gen), scale * torch.randn(n, h, generator=gen)


def test_release_dv_is_ours_minus_the_closed_form_correction():
    from utils.mi.release_compat import Quirks

    local, global_ = _random_features()
    ours = mi_per_sample(local, global_, "dv")
    release = mi_per_sample(local, global_, "dv", quirks=Quirks(dv_mask=True))
    u = scores(local, global_)
    n = u.shape[0]
    eye = torch.eye(n, dtype=torch.bool).unsqueeze(-1)
    lse_neg = torch.logsumexp(u.masked_fill(eye, float("-inf")), dim=1)  # (N, L), j ≠ i
    correction = torch.nn.functional.softplus(-lse_neg).mean(dim=1)
    assert torch.allclose(release, ours - correction, atol=1e-5)
    assert (correction > 0).all()  # the quirk always lowers the bound


def test_release_dv_equals_the_positive_kept_as_a_zero_score():
    from utils.mi.release_compat import Quirks

    local, global_ = _random_features(seed=1)
    u = scores(local, global_)
    n = u.shape[0]
    eye = torch.eye(n, dtype=torch.bool).unsqueeze(-1)
    pos = torch.diagonal(u, dim1=0, dim2=1).transpose(0, 1)
    # The release multiplied the scores by the off-diagonal mask: exp(0) = 1 stays in the sum.
    by_hand = (pos - (torch.logsumexp(u * ~eye, dim=1) - math.log(n - 1))).mean(dim=1)
    assert torch.allclose(mi_per_sample(local, global_, "dv", quirks=Quirks(dv_mask=True)), by_hand, atol=1e-5)


def test_release_nce_keeps_own_locations_at_minus_ten():
    from utils.mi.release_compat import Quirks

    local, global_ = (t.double() for t in _random_features(n=4, loc=3, scale=0.5, seed=2))
    u = scores(local, global_)
    n, _, n_loc = u.shape
    expected = torch.empty(n, dtype=u.dtype)
    for i in range(n):  # the candidates built one by one, as the DIM code lays them out
        per_loc = []
        for l_ in range(n_loc):
            candidates = [u[i, i, l_]]
            for j in range(n):
                for m in range(n_loc):
                    candidates.append(u.new_tensor(-10.0) if j == i else u[i, j, m])
            per_loc.append(torch.log_softmax(torch.stack(candidates), dim=0)[0])
        expected[i] = torch.stack(per_loc).mean()
    got = mi_per_sample(local, global_, "nce", quirks=Quirks(nce_mask=True))
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    assert (mi_per_sample(local, global_, "nce") - got).min() > 1e-7  # extra candidates lower the bound
    # As an estimate, log of the 1 + N·L candidates is added.
    est = mi_per_sample(local, global_, "nce", estimate=True, quirks=Quirks(nce_mask=True))
    assert torch.allclose(est, expected + math.log(1 + n * n_loc), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["jsd", "nce"])
def test_release_batch_bounds_give_every_sample_the_batch_mean(mode):
    from utils.mi.release_compat import Quirks

    local, global_ = _random_features(seed=3)
    ours = mi_per_sample(local, global_, mode)
    release = mi_per_sample(local, global_, mode, quirks=Quirks(batch_bounds=True))
    assert torch.allclose(release, ours.mean().expand_as(ours))
    assert ours.std() > 0  # per-sample values that the quirk flattens


def test_release_batch_bounds_leave_dv_per_sample():
    from utils.mi.release_compat import Quirks

    local, global_ = _random_features(seed=4)
    assert torch.equal(mi_per_sample(local, global_, "dv", quirks=Quirks(batch_bounds=True, nce_mask=True)),
                       mi_per_sample(local, global_, "dv"))
