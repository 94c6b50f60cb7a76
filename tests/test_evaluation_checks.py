"""utils/evaluation/checks.py: the trust checks on per-model results and on tiny hand-made models."""
import torch

from tests.helpers import Tiny, model_result, tiny_split
from utils.attacks.registry import build_attack
from utils.evaluation.checks import check_results, check_sweep, zero_gradient_fraction


def test_zero_gradient_fraction():
    x, y = tiny_split(8).images.float() / 255, tiny_split(8).labels
    assert zero_gradient_fraction(Tiny("round"), x, y) == 1.0
    assert zero_gradient_fraction(Tiny("plain"), x, y) == 0.0


def test_result_checks_flag_robust_above_clean_and_pgd_below_aa():
    attacks = [build_attack("pgd40"), build_attack("aa")]
    bad = model_result([1, 0, 0, 0], pgd40=[1, 1, 0, 0], aa=[0, 0, 0, 0])
    assert any("above the clean" in m for m in check_results([bad], attacks))
    weak_aa = model_result([1, 1, 1, 1], pgd40=[1, 0, 0, 0], aa=[1, 1, 0, 0])
    messages = check_results([weak_aa], attacks)
    assert any("below AutoAttack" in m for m in messages)
    assert check_results([weak_aa], attacks, transfer=True) == []  # transferred AA need not be stronger
    fine = model_result([1, 1, 1, 1], pgd40=[1, 1, 0, 0], aa=[1, 0, 0, 0])
    assert check_results([fine], attacks) == []
    # Another budget for PGD: no comparison.
    assert check_results([weak_aa], [build_attack("pgd40", epsilon=4 / 255), attacks[1]]) == []


def test_sweep_check_flags_accuracy_that_does_not_fall():
    def swept(*accs):
        r = model_result([1, 1, 1, 1])
        r.sweep["pgd40"] = {e: torch.arange(4) < k for e, k in zip((0.0, 0.01, 0.02, 0.03), accs)}
        return r

    assert check_sweep([swept(4, 3, 2, 0)]) == []
    assert any("rises" in m for m in check_sweep([swept(4, 2, 3, 1)]))
    assert any("does not fall" in m for m in check_sweep([swept(4, 3, 3, 3)]))


