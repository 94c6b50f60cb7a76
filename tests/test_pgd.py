"""Properties of the one PGD loop (utils/attacks/pgd.py)."""
import pytest
import torch
import torch.nn.functional as F

from tests.attack_helpers import blobs, tiny_cnn
from utils.attacks.base import lp_norm, random_start
from utils.attacks.pgd import pgd


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = tiny_cnn()
    x, y = blobs()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return model, x, y


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.5)])
def test_perturbation_stays_in_ball_and_box(trained, norm, eps):
    model, x, y = trained
    x_adv = pgd(model, x, y, eps, eps / 4, 10, norm)
    assert lp_norm(x_adv - x, norm).max() <= eps + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() > eps / 10  # it moved


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_input_unchanged_and_no_parameter_grads(trained, norm):
    model, x, y = trained
    for p in model.parameters():
        p.grad = None
    before = x.clone()
    pgd(model, x, y, 0.1, 0.025, 5, norm)
    assert torch.equal(x, before)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_attack_lowers_accuracy(trained):
    model, x, y = trained
    clean = (model(x).argmax(1) == y).float().mean()
    x_adv = pgd(model, x, y, 0.15, 0.04, 10, "linf")
    robust = (model(x_adv).argmax(1) == y).float().mean()
    assert clean > 0.9
    assert robust < clean - 0.3


def test_pgd_beats_random_noise(trained):
    model, x, y = trained
    noise = (x + random_start(x, 0.1, "linf")).clamp(0, 1)
    x_adv = pgd(model, x, y, 0.1, 0.025, 10, "linf")
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(noise), y)


def test_same_seed_same_result(trained):
    model, x, y = trained
    a = pgd(model, x, y, 0.1, 0.025, 3, "linf", generator=torch.Generator().manual_seed(5))
    b = pgd(model, x, y, 0.1, 0.025, 3, "linf", generator=torch.Generator().manual_seed(5))
    c = pgd(model, x, y, 0.1, 0.025, 3, "linf", generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(1)
    d = pgd(model, x, y, 0.1, 0.025, 3, "linf")
    torch.manual_seed(1)
    e = pgd(model, x, y, 0.1, 0.025, 3, "linf")
    assert torch.equal(d, e)


def test_train_mode_and_batchnorm_statistics_restored():
    model = tiny_cnn()
    model.train()
    model[1].eval()  # a mixed state must come back exactly as it was
    x, y = blobs(32)
    stats = model[1].running_mean.clone()
    pgd(model, x, y, 0.1, 0.025, 3, "linf")
    assert model.training and model[0].training and not model[1].training
    assert torch.equal(model[1].running_mean, stats)
    model.train()
    pgd(model, x, y, 0.1, 0.025, 3, "linf")
    assert all(m.training for m in model.modules())
    assert torch.equal(model[1].running_mean, stats)


def test_attack_runs_in_eval_mode():
    model = tiny_cnn()
    seen = []
    model.register_forward_pre_hook(lambda m, inp: seen.append(m.training))
    model.train()
    x, y = blobs(16)
    pgd(model, x, y, 0.1, 0.025, 2, "linf")
    assert seen and not any(seen)


@pytest.mark.parametrize("loss,expected", [("ce", 4), ("kl", 5)])
def test_one_forward_per_step(loss, expected):
    model = tiny_cnn()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    x, y = blobs(16)
    pgd(model, x, y, 0.1, 0.025, 4, "linf", loss=loss)
    assert len(calls) == expected  # KL needs the prediction on x once


def test_kl_loss_without_random_start_moves_away_from_clean_prediction(trained):
    model, x, y = trained
    x_adv = pgd(model, x, y, 0.1, 0.025, 5, "linf", loss="kl", random_start="normal")
    with torch.no_grad():
        kl = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(model(x), 1), reduction="batchmean")
    assert kl > 1e-3


def test_custom_loss_callable(trained):
    model, x, y = trained
    target = torch.full_like(y, 2)
    # a targeted attack: descend the CE to class 2 by ascending its negative
    x_adv = pgd(model, x, y, 0.3, 0.05, 20, "linf", loss=lambda logits, _: -F.cross_entropy(logits, target))
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == 2).float().mean() > (model(x).argmax(1) == 2).float().mean()


def test_bad_arguments():
    model = tiny_cnn()
    x, y = blobs(4)
    with pytest.raises(ValueError, match="norm"):
        pgd(model, x, y, 0.1, 0.1, 1, "l1")
    with pytest.raises(ValueError, match="loss"):
        pgd(model, x, y, 0.1, 0.1, 1, "linf", loss="hinge")
