"""utils/training/balance.py: the gradient balance against separate backward passes, the MI-gradient cap,
the per-epoch summary, the warning and the collapse guard."""
import math

import pytest
import torch
import torch.nn.functional as F

from utils.script import Collapsed
from utils.training.balance import BalanceLog, BalanceMonitor, collapsed, grad_balance, measured_batches


def _problem(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    frozen = torch.nn.Linear(3, 2).double().requires_grad_(False)  # like the estimators: no part of θ
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))

    def losses():
        logits = model(x)
        return F.cross_entropy(logits, y), 3.0 * frozen(logits).square().mean()
    return model, losses


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def _flat(grads):
    return torch.cat([g.flatten() for g in grads])


def test_grad_balance_matches_separate_backward_passes():
    model, losses = _problem()
    l_adv, weighted_mi = losses()
    loss, got = grad_balance(model, l_adv, weighted_mi)
    assert all(p.grad is None for p in model.parameters())  # .grad untouched
    g_all = _flat(_grads(model, loss))  # the graph is still there for the training step
    g_adv, g_mi = _flat(_grads(model, losses()[0])), _flat(_grads(model, losses()[1]))
    assert torch.allclose(g_all, g_adv + g_mi, rtol=1e-12)
    assert float(got["grad_adv"]) == pytest.approx(float(g_adv.norm()), rel=1e-12)
    assert float(got["grad_mi"]) == pytest.approx(float(g_mi.norm()), rel=1e-12)
    assert float(got["grad_ratio"]) == pytest.approx(float(g_mi.norm() / g_adv.norm()), rel=1e-12)
    assert float(got["grad_cos"]) == pytest.approx(float(F.cosine_similarity(g_adv, g_mi, dim=0)), rel=1e-12)


def test_grad_balance_of_a_term_without_theta_is_zero():
    model = torch.nn.Linear(3, 2)
    l_adv = model(torch.randn(4, 3)).sum()
    _, got = grad_balance(model, l_adv, torch.zeros(()))  # an empty W: L_mi is a constant
    assert got["grad_mi"] == 0 and got["grad_adv"] > 0 and got["grad_ratio"] == 0 and got["grad_cos"] == 0


@pytest.mark.parametrize("rho", [0.05, 0.3, 1e6])
def test_the_cap_bounds_the_applied_ratio_and_its_gradient_is_the_capped_sum(rho):
    model, losses = _problem(1)
    g_adv, g_mi = _flat(_grads(model, losses()[0])), _flat(_grads(model, losses()[1]))
    l_adv, weighted_mi = losses()
    loss, got = grad_balance(model, l_adv, weighted_mi, clip=rho)
    scale = min(1.0, rho * float(g_adv.norm() / g_mi.norm()))
    assert float(got["mi_scale"]) == pytest.approx(scale, rel=1e-12)
    assert float(got["grad_ratio_applied"]) <= rho * (1 + 1e-12)
    assert float(loss.detach()) == pytest.approx(float((l_adv + scale * weighted_mi).detach()), rel=1e-12)
    applied = _flat(_grads(model, loss))
    assert torch.allclose(applied, g_adv + scale * g_mi, rtol=1e-10, atol=1e-14)
    assert float((applied - g_adv).norm() / g_adv.norm()) <= rho * (1 + 1e-9)
    if rho == 1e6:  # a cap above the ratio changes nothing
        assert scale == 1.0 and torch.allclose(applied, g_adv + g_mi, rtol=1e-12)


def test_the_summary_leaves_out_empty_w_and_reads_none_without_a_batch():
    log = BalanceLog()
    assert log.summary()["balance_batches"] == 0 and log.summary()["grad_ratio"] is None
    for ratio, w in ((2.0, 3), (0.0, 0), (0.5, 1), (1.0, 2)):
        log.add({"grad_adv": torch.tensor(1.0), "grad_mi": torch.tensor(ratio), "grad_ratio": torch.tensor(ratio),
                 "grad_cos": torch.tensor(-ratio / 4)}, torch.tensor(float(w)))
    summary = log.summary()
    assert summary["balance_batches"] == 3  # the batch with an empty W is no measurement
    assert summary["grad_ratio"] == 1.0 and summary["grad_ratio_max"] == 2.0 and summary["grad_cos"] == -0.25
    assert summary["mi_scale"] == 1.0 and summary["grad_ratio_applied"] == 1.0  # no cap: all of it applied


def test_measured_batches_spread_over_the_epoch():
    assert measured_batches(65, 8) == [0, 8, 16, 24, 32, 40, 48, 56]
    assert measured_batches(3, 8) == [0, 1, 2]
    assert measured_batches(10, 0) == []


def _monitor(**kw):
    settings = dict(batches=2, limit=0.5, clip=None, guard=True, num_classes=10, advice="lower --alpha (now 5)")
    return BalanceMonitor(**{**settings, **kw})


def _epoch(monitor, ratios, w=1.0):
    monitor.start_epoch(len(ratios))
    for ratio in ratios:
        if monitor.measure_next():
            monitor.record({"grad_adv": torch.tensor(1.0), "grad_mi": torch.tensor(ratio),
                            "grad_ratio": torch.tensor(ratio), "grad_cos": torch.tensor(0.0),
                            "w_size": torch.tensor(w)})


def test_the_warning_is_one_line_per_epoch_and_names_the_flag(capsys):
    monitor = _monitor()
    _epoch(monitor, [3.0, 9.0, 5.0, 4.0])  # measures batches 0 and 2
    stats = {"train_epsilon": 0.1, "train_loss": 2.0}
    monitor.end_training(2, stats)
    assert stats["balance_batches"] == 2 and stats["grad_ratio"] == 3.0 and stats["grad_ratio_max"] == 5.0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "epoch 2" in lines[0] and "--alpha" in lines[0] and "--balance-limit 0.5" in lines[0]
    _epoch(monitor, [0.1, 0.2])
    monitor.end_training(3, {"train_epsilon": 0.1, "train_loss": 2.0})
    assert capsys.readouterr().err == ""


def test_the_guard_stops_a_fall_to_chance_and_spares_a_slow_start():
    monitor = _monitor()
    monitor.end_evaluation(1, {"train_epsilon": 0.1, "clean_acc": 9.0})  # never above chance yet: trains on
    monitor.end_evaluation(2, {"train_epsilon": 0.0, "clean_acc": 60.0})
    monitor.end_evaluation(3, {"train_epsilon": 0.0, "clean_acc": 12.0})  # a clean epoch is not guarded
    with pytest.raises(Collapsed, match=r"epoch 4: .*fell to 11\.00 %.*--alpha.*last\.pth keeps epoch 3"):
        monitor.end_evaluation(4, {"train_epsilon": 0.1, "clean_acc": 11.0})
    off = _monitor(guard=False)
    off.end_evaluation(1, {"train_epsilon": 0.1, "clean_acc": 60.0})
    off.end_evaluation(2, {"train_epsilon": 0.1, "clean_acc": 10.0})
    resumed = _monitor()
    resumed.resume_from([{"clean_acc": 70.0}])
    with pytest.raises(Collapsed):
        resumed.end_evaluation(5, {"train_epsilon": 0.1, "clean_acc": 10.0})


def test_the_guard_stops_a_non_finite_loss():
    monitor = _monitor()
    _epoch(monitor, [1.0, 1.0])
    with pytest.raises(Collapsed, match="training loss is nan"):
        monitor.end_training(2, {"train_epsilon": 0.1, "train_loss": math.nan})


def test_chance_is_one_and_a_half_times_a_uniform_guess():
    assert collapsed(15.0, 10) and not collapsed(15.1, 10) and collapsed(1.5, 100)
