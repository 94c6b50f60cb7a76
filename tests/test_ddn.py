"""Decoupled direction and norm (utils/attacks/ddn.py), through the registry's entry."""
import pytest
import torch

from tests.attack_helpers import Halfspace
from utils.attacks.registry import build_attack, robust_mask


@pytest.mark.parametrize("eps", [0.15, 0.3])
def test_ddn_breaks_what_lies_within_a_small_epsilon(eps):
    """The boundary is 0.1 away: DDN must find it within ε. Started at norm 1, its 20
    iterations could not get below 1.05·0.95^19 ≈ 0.40 and would report every sample robust."""
    model, x = Halfspace(0.1), torch.full((4, 1, 4, 4), 0.5)
    y = torch.zeros(4, dtype=torch.long)
    attack = build_attack("ddn", epsilon=eps)
    x_adv = attack(model, x, y)
    assert not robust_mask(model, x, y, x_adv, attack).any()
    assert not attack.epsilon_free and build_attack("cw").epsilon_free
