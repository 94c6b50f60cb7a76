"""Carlini-Wagner L2 (utils/attacks/cw.py)."""
import pytest
import torch

from tests.attack_helpers import Halfspace
from utils.attacks.cw import cw_l2, margin_loss


def test_cw_margin_loss():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0]])
    y = torch.tensor([0, 1])
    assert torch.allclose(margin_loss(logits, y), torch.tensor([2.0, -0.0]))
    assert torch.allclose(margin_loss(logits, y, confidence=10.0), torch.tensor([2.0, -3.0]))


def test_cw_returns_the_nearest_success_and_the_search_tightens_it():
    """Halfspace at m = 0.1 from the all-0.5 image: the minimum-norm answer lies m away, along −w.

    c = 10 is far above what the boundary needs (the 1-D objective t² + 2c·(m − t)⁺ crosses it
    for c > m), so a single constant pulls at Adam's full speed, ≈ lr per coordinate in tanh
    space, hence at most ½·lr·√d = 0.02 = 0.2·m in L2 per step: its first success lies less
    than a step past the boundary. After it Adam's momentum overshoots far out, so the last
    success is much further than the smallest one, which is what must come back.
    Five constants run the same first constant (so they can only do as well) and then bisect
    c down (5, 2.5, 1.25, 0.625): weaker pulls whose steps shrink as the distance term grows
    near the boundary, and whose crossings fall elsewhere; the smallest of all is returned."""
    margin, lr, steps = 0.1, 0.01, 50
    model, x = Halfspace(margin), torch.full((1, 1, 4, 4), 0.5)
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
