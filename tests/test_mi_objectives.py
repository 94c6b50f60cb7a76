import math

import pytest
import torch

from utils.mi.objectives import (
    MITable,
    estimator_loss_max,
    estimator_loss_paper,
    estimator_loss_release,
    safe_cosine,
)
from utils.mi.patterns import Selection

# Hand-built batch of 6: samples 0, 1 in R; 2, 3 in W; 4, 5 misclassified on x (outside C).
T, F = True, False
SEL = Selection(
    correct=torch.tensor([T, T, T, T, F, F]),
    right=torch.tensor([T, T, F, F, F, F]),
    wrong=torch.tensor([F, F, T, T, F, F]),
)
N_NAT = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # Î_n(x, h(x))
N_ADV = [2.0, 1.0, 1.0, 2.0, 0.0, 0.0]  # Î_n(x, h(x̃))
A_NAT = [0.5, 1.0, 2.0, 1.0, 7.0, 7.0]  # Î_a(n, h(x))
A_ADV = [1.0, 1.0, 1.0, 3.0, 9.0, 9.0]  # Î_a(n, h(x̃))

# Cosines worked out by hand on the restricted vectors (the signs of a = −Î cancel in a cosine).
COS_N_R = (1 * 2 + 2 * 1) / (math.sqrt(5) * math.sqrt(5))  # (1, 2) vs (2, 1)
COS_N_W = (3 * 1 + 4 * 2) / (5 * math.sqrt(5))  # (3, 4) vs (1, 2)
COS_A_R = (0.5 * 1 + 1 * 1) / (math.sqrt(1.25) * math.sqrt(2))  # (0.5, 1) vs (1, 1)
COS_A_W = (2 * 1 + 1 * 3) / (math.sqrt(5) * math.sqrt(10))  # (2, 1) vs (1, 3)


def _mi_table(mi_n_nat, mi_n_adv, mi_a_nat, mi_a_adv, sel):
    """The Fig. 4 table of one batch."""
    return MITable().update(mi_n_nat, mi_n_adv, mi_a_nat, mi_a_adv, sel).result()


def _vectors(requires_grad=False):
    return [torch.tensor(v, requires_grad=requires_grad) for v in (N_NAT, N_ADV, A_NAT, A_ADV)]


def _close(t, value):
    assert t.item() == pytest.approx(value, abs=1e-5)


def test_safe_cosine():
    _close(safe_cosine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])), 1 / math.sqrt(2))
    a = torch.zeros(3, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    c = safe_cosine(a, b)
    c.backward()
    assert c.item() == 0.0 and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_release_objective_by_hand():
    loss_n, loss_a = estimator_loss_release(*_vectors(), SEL)
    # E_n: |C| = 4. L_R = 5|1 − cos| + (−1 − 2)/4; L_W = 5|cos| + (−3 − 4)/4.
    l_r = 5 * abs(1 - COS_N_R) + (-3) / 4
    l_w = 5 * abs(COS_N_W) + (-7) / 4
    _close(loss_n, l_w + 0.5 * l_r)
    # E_a: L_W = 5|cos| + (−1 − 3)/|W|; L_R = 8|1 − cos| − 0.1·(−1 − 1)/|R|.
    l_w = 5 * abs(COS_A_W) + (-4) / 2
    l_r = 8 * abs(1 - COS_A_R) - 0.1 * (-2) / 2
    _close(loss_a, l_w + 0.5 * l_r)


def test_release_objective_takes_the_absolute_w_cosine():
    # On W = {2, 3} the two vectors of each estimator now point in opposite directions, so both
    # W cosines are negative and §5's w·|cos| differs from w·cos. R and the sums are as in SEL.
    n_adv = [2.0, 1.0, -1.0, -2.0, 0.0, 0.0]  # Î_n(x, h(x̃)) on W: (−1, −2) against Î_n(x, h(x)) = (3, 4)
    a_nat = [0.5, 1.0, -2.0, -1.0, 7.0, 7.0]  # Î_a(n, h(x)) on W: (−2, −1) against Î_a(n, h(x̃)) = (1, 3)
    cos_n_w = (3 * -1 + 4 * -2) / (5 * math.sqrt(5))
    cos_a_w = (-2 * 1 + -1 * 3) / (math.sqrt(5) * math.sqrt(10))
    assert cos_n_w < -0.9 and cos_a_w < -0.7
    vecs = [torch.tensor(v) for v in (N_NAT, n_adv, a_nat, A_ADV)]
    loss_n, loss_a = estimator_loss_release(*vecs, SEL)
    # E_n: L_W = 5|cos| + Σ_W a_n(x)/|C| = 5|cos| − (3 + 4)/4; L_R unchanged.
    _close(loss_n, 5 * abs(cos_n_w) - 7 / 4 + 0.5 * (5 * abs(1 - COS_N_R) - 3 / 4))
    # E_a: L_W = 5|cos| + Σ_W a_a(x̃)/|W| = 5|cos| − (1 + 3)/2; L_R unchanged.
    _close(loss_a, 5 * abs(cos_a_w) - 4 / 2 + 0.5 * (8 * abs(1 - COS_A_R) - 0.1 * (-2) / 2))


def test_release_objective_constants_are_arguments():
    loss_n, loss_a = estimator_loss_release(
        *_vectors(), SEL, cos_weight=1.0, r_weight=2.0, a_r_cos_weight=3.0, a_r_sum_weight=4.0
    )
    _close(loss_n, (abs(COS_N_W) - 7 / 4) + 2.0 * (abs(1 - COS_N_R) - 3 / 4))
    _close(loss_a, (abs(COS_A_W) - 4 / 2) + 2.0 * (3.0 * abs(1 - COS_A_R) - 4.0 * (-2) / 2))


def test_release_objective_empty_sets():
    vecs = _vectors(requires_grad=True)
    no_r = Selection(SEL.correct & SEL.wrong, torch.zeros(6, dtype=torch.bool), SEL.wrong)
    loss_n, loss_a = estimator_loss_release(*vecs, no_r)
    # |C| = |W| = 2 now; the R terms vanish.
    _close(loss_n, 5 * COS_N_W + (-7) / 2)
    _close(loss_a, 5 * COS_A_W + (-4) / 2)

    no_w = Selection(SEL.right, SEL.right, torch.zeros(6, dtype=torch.bool))
    loss_n, loss_a = estimator_loss_release(*vecs, no_w)
    _close(loss_n, 0.5 * (5 * (1 - COS_N_R) + (-3) / 2))
    _close(loss_a, 0.5 * (8 * (1 - COS_A_R) - 0.1 * (-2) / 2))

    nothing = Selection(*(torch.zeros(6, dtype=torch.bool) for _ in range(3)))
    loss_n, loss_a = estimator_loss_release(*vecs, nothing)
    _close(loss_n, -sum(N_NAT) / 6)  # mean a_n(x) over the batch
    _close(loss_a, -sum(A_ADV) / 6)  # mean a_a(x̃) over the batch
    (loss_n + loss_a).backward()
    assert all(torch.isfinite(v.grad).all() for v in vecs)


def test_paper_objective_by_hand():
    loss_n, loss_a = estimator_loss_paper(*_vectors(), SEL.wrong)
    _close(loss_n, -((3 + 4) / 2 - (1 + 2) / 2))
    _close(loss_a, -((1 + 3) / 2 - (2 + 1) / 2))


def test_paper_objective_empty_w():
    vecs = _vectors(requires_grad=True)
    loss_n, loss_a = estimator_loss_paper(*vecs, torch.zeros(6, dtype=torch.bool))
    assert loss_n.item() == 0.0 and loss_a.item() == 0.0
    (loss_n + loss_a).backward()  # a zero that still depends on the inputs
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in vecs)


def test_max_objective_by_hand():
    n_nat, _, _, a_adv = _vectors(requires_grad=True)
    fooled = torch.tensor([F, F, T, T, T, F])  # sample 4 was wrong on x and still counts
    loss_n, loss_a = estimator_loss_max(n_nat, a_adv, SEL.correct, fooled)
    _close(loss_n, -(1 + 2 + 3 + 4) / 4)
    _close(loss_a, -(1 + 3 + 9) / 3)

    empty = torch.zeros(6, dtype=torch.bool)
    loss_n, loss_a = estimator_loss_max(n_nat, a_adv, empty, empty)
    assert loss_n.item() == 0.0 and loss_a.item() == 0.0
    (loss_n + loss_a).backward()
    assert torch.isfinite(n_nat.grad).all() and torch.isfinite(a_adv.grad).all()


def test_mi_table_by_hand():
    table = _mi_table(*_vectors(), SEL)
    assert table["n_right"] == 2 and table["n_wrong"] == 2
    assert table["natural_mi_x_right"] == pytest.approx(1.5)
    assert table["natural_mi_xadv_right"] == pytest.approx(1.5)
    assert table["adversarial_mi_x_right"] == pytest.approx(0.75)
    assert table["adversarial_mi_xadv_right"] == pytest.approx(1.0)
    assert table["natural_mi_x_wrong"] == pytest.approx(3.5)
    assert table["natural_mi_xadv_wrong"] == pytest.approx(1.5)
    assert table["adversarial_mi_x_wrong"] == pytest.approx(1.5)
    assert table["adversarial_mi_xadv_wrong"] == pytest.approx(2.0)


def test_mi_table_accumulates_over_batches():
    vecs = [torch.randn(10) for _ in range(4)]
    sel = Selection(*(torch.rand(10) < 0.7 for _ in range(3)))
    sel = Selection(sel.correct, sel.correct & sel.right, sel.correct & ~sel.right)
    whole = _mi_table(*vecs, sel)
    acc = MITable()
    for part in (slice(0, 3), slice(3, 10)):
        acc.update(*(v[part] for v in vecs), Selection(*(m[part] for m in sel)))
    split = acc.result()
    assert split.keys() == whole.keys()
    for key in whole:
        assert split[key] == pytest.approx(whole[key])


def test_mi_table_empty_set_is_nan_with_zero_count():
    nothing = Selection(*(torch.zeros(6, dtype=torch.bool) for _ in range(3)))
    table = _mi_table(*_vectors(), nothing)
    assert table["n_right"] == 0 and table["n_wrong"] == 0
    assert math.isnan(table["natural_mi_x_wrong"])
