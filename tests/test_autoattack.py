"""AutoAttack through pyautoattack (utils/attacks/autoattack.py)."""
import warnings

import pytest
import torch
import torch.nn as nn

from tests.attack_helpers import N_CLASSES, train_tiny
from utils.attacks.autoattack import autoattack, build_autoattack
from utils.attacks.registry import build_attack, robust_mask


@pytest.fixture(scope="module")
def tiny():
    return train_tiny()


def test_autoattack_matches_a_direct_call(tiny):
    from pyautoattack import AutoAttack

    model, x, y = tiny
    x, y = x[:12], y[:12]
    epsilon = 0.04
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = autoattack(model, x, y, epsilon, version="standard", seed=0)
        model.eval()
        direct = AutoAttack(model, norm="Linf", eps=epsilon, version="standard", seed=0, device=x.device)
        direct.verbose = False
        theirs, _ = direct.run_standard_evaluation(x, y, batch_size=500)
    assert torch.equal(ours, theirs)
    attack = build_attack("aa", epsilon=epsilon)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean()
        direct_acc = (model(theirs).argmax(1) == y).float().mean()
    acc = robust_mask(model, x, y, ours, attack).float().mean()
    assert acc == direct_acc and acc < clean


def test_autoattack_versions():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, N_CLASSES))
    release = build_autoattack(model, 8 / 255, version="release")
    assert release.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    # The same as if APGD had been built with 40 iterations.
    from pyautoattack.autopgd_base import APGDAttack

    fresh = APGDAttack(model, n_iter=40, eps=8 / 255)
    for apgd in (release.apgd, release.apgd_targeted):
        for attr in ("n_iter", "n_iter_orig", "n_iter_2", "n_iter_min", "size_decr"):
            assert getattr(apgd, attr) == getattr(fresh, attr)
    assert release.fab.n_iter == 40 and release.square.n_queries == 5000
    standard = build_autoattack(model, 8 / 255)
    assert standard.apgd.n_iter == 100 and standard.fab.n_iter == 100
    custom = build_autoattack(model, 0.5, norm="l2", version="custom", attacks_to_run=["apgd-ce"], n_queries=10)
    assert custom.attacks_to_run == ["apgd-ce"] and custom.norm == "L2" and custom.square.n_queries == 10
    with pytest.raises(ValueError, match="custom"):
        build_autoattack(model, 0.1, version="custom")
    with pytest.raises(ValueError, match="only read"):
        build_autoattack(model, 0.1, attacks_to_run=["apgd-ce"])
    with pytest.raises(ValueError, match="unknown AutoAttack version"):
        build_autoattack(model, 0.1, version="fast")


def test_autoattack_reads_float32_logits_under_bf16_autocast(monkeypatch):
    """A bf16-autocast forward gives bf16 logits; AutoAttack must be handed fp32 ones."""
    import utils.attacks.autoattack as aa_module

    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bare = net(x)
        wrapped = aa_module._Float32Logits(net)(x)
    assert bare.dtype == torch.bfloat16  # the premise: autocast does lower the model's logits
    assert wrapped.dtype == torch.float32 and torch.equal(wrapped, bare.float())

    seen = []

    class Adversary:
        def __init__(self, model):
            self.model = model

        def run_standard_evaluation(self, xb, yb, batch_size):
            seen.append(self.model(xb).dtype)
            return xb.clone(), yb

    monkeypatch.setattr(aa_module, "build_autoattack", lambda model, *args, **kwargs: Adversary(model))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = aa_module.autoattack(net, x, y, 0.1)
    assert seen == [torch.float32] and torch.equal(x_adv, x)
