"""Standard AT, TRADES and MART (utils/training/losses.py) against values computed by hand."""
import math

import pytest
import torch

from utils.training.losses import adversarial_loss, mart_loss, trades_loss


def softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


LOGITS_NAT = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
LOGITS_ADV = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.2, 0.3]])
Y = torch.tensor([0, 1])


def test_standard_at_is_cross_entropy_on_adversarial_logits():
    expected = sum(-math.log(softmax(r)[t]) for r, t in zip(LOGITS_ADV.tolist(), Y.tolist())) / 2
    got = adversarial_loss("ce", LOGITS_ADV, Y)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_trades_by_hand():
    beta = 6.0
    ce = sum(-math.log(softmax(r)[t]) for r, t in zip(LOGITS_NAT.tolist(), Y.tolist())) / 2
    kl = 0.0
    for rn, ra in zip(LOGITS_NAT.tolist(), LOGITS_ADV.tolist()):
        p, q = softmax(rn), softmax(ra)
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected = ce + beta * kl / 2
    assert trades_loss(LOGITS_NAT, LOGITS_ADV, Y, beta).item() == pytest.approx(expected, rel=1e-5)
    assert adversarial_loss("trades", LOGITS_ADV, Y, LOGITS_NAT, beta).item() == pytest.approx(expected, rel=1e-5)


def test_mart_by_hand():
    beta = 6.0
    total_bce, total_kl = 0.0, 0.0
    for rn, ra, t in zip(LOGITS_NAT.tolist(), LOGITS_ADV.tolist(), Y.tolist()):
        p, q = softmax(rn), softmax(ra)
        runner_up = max((k for k in range(3) if k != t), key=lambda k: q[k])
        total_bce += -math.log(q[t]) - math.log(1.0001 - q[runner_up] + 1e-12)
        kl = sum(pi * (math.log(pi + 1e-12) - math.log(qi + 1e-12)) for pi, qi in zip(p, q))
        total_kl += kl * (1.0000001 - p[t])
    expected = total_bce / 2 + beta * total_kl / 2
    assert mart_loss(LOGITS_NAT, LOGITS_ADV, Y, beta).item() == pytest.approx(expected, rel=1e-5)


def _boosted_ce(row, label, runner_up):
    q = softmax(row)
    return -math.log(q[label]) - math.log(1.0001 - q[runner_up] + 1e-12)


def test_mart_runner_up_when_prediction_is_wrong():
    # The runner-up is max_{k≠y} p_k(x̃). Sample 0 (label 0) is predicted as class 1: the runner-up is
    # the prediction itself, class 1, not the second of the top two (class 2). Sample 1 (label 0) is
    # predicted right: its runner-up is the second of the top two, class 2.
    adv = torch.tensor([[0.0, 1.0, 0.5], [3.0, 1.0, 2.0]])
    nat = torch.tensor([[2.0, 0.0, -1.0], [1.0, 0.0, 0.5]])
    y = torch.tensor([0, 0])
    assert adv.argmax(1).tolist() == [1, 0]
    rows = adv.tolist()
    expected_ce = (_boosted_ce(rows[0], 0, 1) + _boosted_ce(rows[1], 0, 2)) / 2
    wrong_choice = (_boosted_ce(rows[0], 0, 2) + _boosted_ce(rows[1], 0, 2)) / 2
    assert expected_ce != pytest.approx(wrong_choice, rel=1e-3)  # the case tells the two choices apart
    assert mart_loss(nat, adv, y, 0.0).item() == pytest.approx(expected_ce, rel=1e-6)
    # With β the KL term is added on top, weighted per sample by 1 − p_y(x).
    kl = 0.0
    for rn, ra, t in zip(nat.tolist(), rows, y.tolist()):
        p, q = softmax(rn), softmax(ra)
        kl += sum(pi * (math.log(pi + 1e-12) - math.log(qi + 1e-12)) for pi, qi in zip(p, q)) * (1.0000001 - p[t])
    assert mart_loss(nat, adv, y, 6.0).item() == pytest.approx(expected_ce + 6.0 * kl / 2, rel=1e-6)


def test_losses_need_natural_logits_and_known_names():
    with pytest.raises(ValueError, match="natural"):
        adversarial_loss("trades", LOGITS_ADV, Y)
    with pytest.raises(ValueError, match="unknown"):
        adversarial_loss("hinge", LOGITS_ADV, Y, LOGITS_NAT)


def test_gradients_flow_to_both_logits():
    nat = LOGITS_NAT.clone().requires_grad_(True)
    adv = LOGITS_ADV.clone().requires_grad_(True)
    for kind in ("trades", "mart"):
        nat.grad = adv.grad = None
        adversarial_loss(kind, adv, Y, nat, 6.0).backward()
        assert nat.grad.abs().sum() > 0 and adv.grad.abs().sum() > 0
