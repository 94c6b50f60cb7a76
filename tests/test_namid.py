"""utils/namid.py: L_mi by hand (paper Eq. 7–9), and the NAMID and WMIM objectives' gradients,
forward counts, ablations and selection on small models."""
import pytest
import torch

from models import get_model
from models.estimator import build_estimator
from tests.test_mi_objectives import COS_A_W, COS_N_W, SEL, _close, _vectors
from utils import namid
from utils.attacks.pgd import pgd
from utils.mi.patterns import select_samples
from utils.mi.release_compat import Quirks
from utils.namid import freeze, namid_loss, namid_objective, wmim_objective

HSIZE = 16


# namid_loss on W = {2, 3}; the λ term is 0.1·mean_W[Î_a(n, h(x̃)) − Î_n(x, h(x̃))].
COS_NAT = abs(1 - COS_N_W)
COS_ADV = abs(1 - COS_A_W)
MEAN_W_A_ADV = (1 + 3) / 2
MEAN_W_N_ADV = (1 + 2) / 2


def test_namid_loss_paper_form_by_hand():
    loss, terms = namid_loss(*_vectors(), SEL.wrong, lam=0.1)
    lam_term = 0.1 * (MEAN_W_A_ADV - MEAN_W_N_ADV)
    _close(loss, COS_NAT + COS_ADV + lam_term)
    _close(terms["cos_nat"], COS_NAT)
    _close(terms["cos_adv"], COS_ADV)
    _close(terms["lam_term"], lam_term)


def test_namid_loss_release_form_by_hand():
    loss, terms = namid_loss(*_vectors(), SEL.wrong, release=True)
    _close(loss, COS_NAT + COS_ADV)
    assert terms["lam_term"].item() == 0.0


@pytest.mark.parametrize(
    "flags, expected",
    [
        (dict(use_nat=False), (0.0, COS_ADV, 0.1 * MEAN_W_A_ADV)),
        (dict(use_adv=False), (COS_NAT, 0.0, -0.1 * MEAN_W_N_ADV)),
        (dict(lam=0.0), (COS_NAT, COS_ADV, 0.0)),
        (dict(use_nat=False, use_adv=False), (0.0, 0.0, 0.0)),
        (dict(use_nat=False, release=True), (0.0, COS_ADV, 0.0)),
    ],
)
def test_namid_ablations_remove_exactly_their_terms(flags, expected):
    loss, terms = namid_loss(*_vectors(), SEL.wrong, **flags)
    for key, value in zip(("cos_nat", "cos_adv", "lam_term"), expected):
        _close(terms[key], value)
    _close(loss, sum(expected))


def _untouched(t):
    return t.grad is None or t.grad.abs().sum() == 0


def test_namid_ablation_gradients():
    # Without the natural-MI terms nothing reaches Î_n; without the adversarial ones nothing reaches Î_a.
    vecs = _vectors(requires_grad=True)
    namid_loss(*vecs, SEL.wrong, use_nat=False)[0].backward()
    assert _untouched(vecs[0]) and _untouched(vecs[1])
    assert vecs[3].grad.abs().sum() > 0
    vecs = _vectors(requires_grad=True)
    namid_loss(*vecs, SEL.wrong, use_adv=False)[0].backward()
    assert _untouched(vecs[2]) and _untouched(vecs[3])
    assert vecs[1].grad.abs().sum() > 0
    # Nothing outside W receives gradient.
    assert vecs[1].grad[[0, 1, 4, 5]].abs().sum() == 0


@pytest.mark.parametrize("release", [False, True])
def test_namid_loss_empty_w(release):
    vecs = _vectors(requires_grad=True)
    loss, terms = namid_loss(*vecs, torch.zeros(6, dtype=torch.bool), release=release)
    assert loss.item() == 0.0
    assert all(t.item() == 0.0 for t in terms.values())
    loss.backward()
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in vecs)


def objective_args(**overrides):
    """namid_objective's keyword arguments: the paper's defaults, then ``overrides``."""
    args = dict(adv_loss="ce", beta=6.0, alpha=5.0, lam=0.1, use_adv=True, use_nat=True, release_loss=False,
                mode="dv", layer=None, quirks=Quirks())
    args.update(overrides)
    return args


def wmim_args(args):
    return {k: args[k] for k in ("alpha", "adv_loss", "beta", "mode", "layer", "quirks")}


def setup(seed=0, n=16):
    torch.manual_seed(seed)
    model = get_model("smallcnn", 10, 3)
    # SmallCNN's last layer starts at zero (TRADES' init): give it varied predictions.
    torch.nn.init.normal_([m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].weight)
    est_n, est_a = (freeze(build_estimator(3, 10, HSIZE)) for _ in range(2))
    x = torch.rand(n, 3, 32, 32)
    y = torch.randint(0, 10, (n,))
    return model, est_n, est_a, x, y


def wrong_batch(model, x):
    """Samples whose eval-mode prediction changes under noise, labelled by the prediction on x: W is all of them."""
    model.eval()
    x_adv = (x + 0.3 * torch.rand_like(x)).clamp(0, 1)
    with torch.no_grad():
        p_nat = model(x).argmax(1)
        p_adv = model(x_adv).argmax(1)
    keep = p_nat != p_adv
    return x[keep], x_adv[keep], p_nat[keep]


def test_forward_count_is_two_plus_attack():
    model, est_n, est_a, x, y = setup()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    model.train()
    x_adv = pgd(model, x, y, 0.1, 0.025, 3, "linf")
    assert len(calls) == 3
    calls.clear()
    namid_objective(model, est_n, est_a, x, x_adv, y, **objective_args(adv_loss="trades"))
    assert len(calls) == 2  # the release ran the target seven times per step


def test_local_nets_see_each_pattern_once():
    model, est_n, est_a, x, y = setup()
    counts = {"n": 0, "a": 0}
    est_n.local.register_forward_hook(lambda *a: counts.__setitem__("n", counts["n"] + 1))
    est_a.local.register_forward_hook(lambda *a: counts.__setitem__("a", counts["a"] + 1))
    namid_objective(model, est_n, est_a, x, (x + 0.05).clamp(0, 1), y, **objective_args())
    assert counts == {"n": 1, "a": 1}


def test_gradients_reach_theta_only_through_the_global_nets(monkeypatch):
    torch.manual_seed(3)
    model, est_n, est_a, x, _ = setup(n=128)
    x, x_adv, y = wrong_batch(model, x)
    assert len(y) >= 4
    args = objective_args(alpha=1.0)
    _, _, extra = namid_objective(model, est_n, est_a, x, x_adv, y, **args)
    assert extra["w_size"] == len(y)

    def grads(alpha):
        model.zero_grad()
        args["alpha"] = alpha
        loss, _, _ = namid_objective(model, est_n, est_a, x, x_adv, y, **args)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    def mi_grad():
        return grads(1.0) - grads(0.0)  # the MI part alone

    assert mi_grad().abs().sum() > 0
    assert all(p.grad is None for p in est_n.parameters()) and all(p.grad is None for p in est_a.parameters())
    # Cut the global branch: no MI gradient may reach θ any other way.
    real = namid.target_outputs
    monkeypatch.setattr(namid, "target_outputs", lambda m, v, layer: tuple(t.detach() if i else t for i, t in
                                                                              enumerate(real(m, v, layer))))
    assert mi_grad().abs().max() < 1e-6


def test_estimators_unchanged_by_a_training_step():
    model, est_n, est_a, x, y = setup()
    before = [{k: v.clone() for k, v in e.state_dict().items()} for e in (est_n, est_a)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    x_adv = pgd(model, x, y, 0.1, 0.025, 2, "linf")
    loss, _, _ = namid_objective(model, est_n, est_a, x, x_adv, y, **objective_args())
    loss.backward()
    opt.step()
    for est, state in zip((est_n, est_a), before):
        assert not est.training
        for k, v in est.state_dict().items():
            assert torch.equal(v, state[k]), k


def test_empty_w_gives_zero_mi_loss():
    model, est_n, est_a, x, _ = setup()
    model.train()
    with torch.no_grad():
        y = (model(x).argmax(1) + 1) % 10  # nothing is correct, so W is empty
    loss, _, extra = namid_objective(model, est_n, est_a, x, (x + 0.05).clamp(0, 1), y, **objective_args())
    assert extra["w_size"] == 0 and extra["l_mi"] == 0
    assert torch.isfinite(loss) and torch.allclose(loss.detach(), extra["l_adv"])
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_each_ablation_removes_exactly_its_terms():
    torch.manual_seed(5)
    model, est_n, est_a, x, _ = setup(n=128)
    x, x_adv, y = wrong_batch(model, x)
    model.eval()  # the same logits for every variant

    def terms(**flags):
        return namid_objective(model, est_n, est_a, x, x_adv, y, **objective_args(**flags))[2]

    full = terms()
    assert full["cos_nat"] > 0 and full["cos_adv"] > 0 and full["lam_term"] != 0
    no_adv, no_nat = terms(use_adv=False), terms(use_nat=False)
    assert no_adv["cos_adv"] == 0 and torch.allclose(no_adv["cos_nat"], full["cos_nat"])
    assert no_nat["cos_nat"] == 0 and torch.allclose(no_nat["cos_adv"], full["cos_adv"])
    # the λ term splits into its adversarial and natural halves
    assert torch.allclose(no_adv["lam_term"] + no_nat["lam_term"], full["lam_term"], atol=1e-6)
    for variant in (terms(lam=0.0), terms(release_loss=True)):
        assert variant["lam_term"] == 0
        assert torch.allclose(variant["cos_nat"], full["cos_nat"])
        assert torch.allclose(variant["cos_adv"], full["cos_adv"])
    total = namid_objective(model, est_n, est_a, x, x_adv, y, **objective_args())
    assert torch.allclose(total[0], full["l_adv"] + 5.0 * (full["cos_nat"] + full["cos_adv"] + full["lam_term"]))


def _reference_l_adv(kind, logits_nat, logits_adv, y, beta):
    from utils.training import losses

    if kind == "trades":
        return losses.trades_loss(logits_nat, logits_adv, y, beta)
    if kind == "mart":
        return losses.mart_loss(logits_nat, logits_adv, y, beta)
    return torch.nn.functional.cross_entropy(logits_adv, y)


@pytest.mark.parametrize("kind", ["ce", "trades", "mart"])
def test_adv_loss_flag_picks_l_adv(kind):
    model, est_n, est_a, x, y = setup()
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    model.eval()  # the same logits here and inside the objective
    with torch.no_grad():
        logits_nat, logits_adv = model(x), model(x_adv)
    expected = _reference_l_adv(kind, logits_nat, logits_adv, y, beta=3.0)
    if kind != "ce":  # the losses differ on this batch, so the comparison tells them apart
        assert not torch.allclose(expected, _reference_l_adv("ce", logits_nat, logits_adv, y, 3.0))
    args = objective_args(adv_loss=kind, beta=3.0)
    extra = namid_objective(model, est_n, est_a, x, x_adv, y, **args)[2]
    torch.testing.assert_close(extra["l_adv"], expected)
    std = freeze(build_estimator(3, 10, HSIZE))
    extra = wmim_objective(model, std, x, x_adv, y, **wmim_args(args))[2]
    torch.testing.assert_close(extra["l_adv"], expected)


@pytest.mark.parametrize("mode", ["dv", "nce"])
def test_wmim_loss_is_l_adv_minus_alpha_times_mean_standard_mi(mode):
    """WMIM maximises Î(x̃; h(x̃)): the MI term enters the loss with a minus sign."""
    from utils.mi.bounds import mi_per_sample

    model, _, _, x, y = setup()
    std = freeze(build_estimator(3, 10, HSIZE))
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    model.eval()
    with torch.no_grad():
        logits_adv = model(x_adv)
        mi = mi_per_sample(std.local(x_adv), std.global_(logits_adv), mode).mean()
        l_adv = torch.nn.functional.cross_entropy(logits_adv, y)
    assert mi.abs() > 1e-3  # a sign flip must show
    loss, logits, extra = wmim_objective(model, std, x, x_adv, y, **wmim_args(objective_args(alpha=2.0, mode=mode)))
    torch.testing.assert_close(extra["standard_mi"], mi)
    torch.testing.assert_close(loss.detach(), l_adv - 2.0 * mi)
    torch.testing.assert_close(logits.detach(), logits_adv)


def test_release_selection_picks_w_by_the_softmax_over_the_batch(monkeypatch):
    model, est_n, est_a, x, y = setup(n=64)
    model.eval()  # no dropout: both calls see the same logits
    x_adv = (x + 0.3 * torch.rand_like(x)).clamp(0, 1)
    with torch.no_grad():
        y = model(x).argmax(1)
        expected = select_samples(model(x), model(x_adv), y, over_batch=True).wrong
        ours = select_samples(model(x), model(x_adv), y).wrong
    assert not torch.equal(expected, ours)
    _, _, extra = namid_objective(model, est_n, est_a, x, x_adv, y, **objective_args(quirks=Quirks(selection=True)))
    assert extra["w_size"] == expected.sum()


