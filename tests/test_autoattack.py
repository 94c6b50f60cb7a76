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


# ---------------------------------------------------------------- resuming from a state file

FAST = {"version": "standard", "n_iter": 3, "n_queries": 30}  # every sub-attack, briefly


def _weak_model():
    from models import get_model

    torch.manual_seed(0)
    model = get_model("smallcnn-nobn", 10, 3).eval()
    nn.init.normal_(model.classifier[-1].weight, std=0.3)
    x = torch.rand(24, 3, 32, 32)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:4] = (y[:4] + 1) % 10  # four clean mistakes
    return model, x, y


def _spy_calls(monkeypatch):
    """The sub-attacks and example counts of every call of the package's run_standard_evaluation."""
    from pyautoattack import AutoAttack

    calls, real = [], AutoAttack.run_standard_evaluation

    def spy(self, x, y, **kwargs):
        calls.append((tuple(self.attacks_to_run), x.shape[0]))
        return real(self, x, y, **kwargs)

    monkeypatch.setattr(AutoAttack, "run_standard_evaluation", spy)
    return calls


def test_a_state_file_gives_the_results_of_one_direct_call(tmp_path, monkeypatch):
    from utils.attacks.autoattack import resume_from

    model, x, y = _weak_model()
    direct = autoattack(model, x, y, 2 / 255, **FAST)
    calls = _spy_calls(monkeypatch)
    with resume_from(tmp_path / "s.pt"):
        kept = autoattack(model, x, y, 2 / 255, **FAST)
    assert torch.equal(kept, direct)
    # One call per sub-attack, each on the examples still robust (20 correct at first).
    assert [c[0] for c in calls] == [("apgd-ce",), ("apgd-t",), ("fab-t",), ("square",)][:len(calls)]
    assert calls[0][1] == 20 and all(a[1] >= b[1] for a, b in zip(calls, calls[1:]))
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert state["run_attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    with torch.no_grad():
        still = model(direct).argmax(1) == y
    assert torch.equal(state["robust_flags"], still) and int(still.sum()) < 20


def test_an_interrupted_state_resumes_without_repeating_a_finished_sub_attack(tmp_path, monkeypatch):
    import utils.training.checkpoint as checkpoint
    from utils.attacks.autoattack import StateMismatch, resume_from

    model, x, y = _weak_model()
    direct = autoattack(model, x, y, 2 / 255, **FAST)
    real_save = checkpoint.atomic_save

    def save_then_die(state, path):
        real_save(state, path)
        if state["run_attacks"] == ["apgd-ce", "apgd-t"]:
            raise KeyboardInterrupt  # a kill right after the second sub-attack was written

    monkeypatch.setattr(checkpoint, "atomic_save", save_then_die)
    with pytest.raises(KeyboardInterrupt), resume_from(tmp_path / "s.pt"):
        autoattack(model, x, y, 2 / 255, **FAST)
    monkeypatch.setattr(checkpoint, "atomic_save", real_save)
    calls = _spy_calls(monkeypatch)
    with resume_from(tmp_path / "s.pt"):
        resumed = autoattack(model, x, y, 2 / 255, **FAST)
    assert [c[0] for c in calls] == [("fab-t",), ("square",)][:len(calls)] and calls
    assert torch.equal(resumed, direct)  # the earlier sub-attacks' examples came back from the file
    calls.clear()
    with resume_from(tmp_path / "s.pt"):  # finished: nothing is attacked again
        again = autoattack(model, x, y, 2 / 255, **FAST)
    assert calls == [] and torch.equal(again, direct)
    with pytest.raises(StateMismatch, match="other examples or settings"), resume_from(tmp_path / "s.pt"):
        autoattack(model, x, (y + 1) % 10, 2 / 255, **FAST)
    with pytest.raises(StateMismatch), resume_from(tmp_path / "s.pt"):
        autoattack(model, x, y, 3 / 255, **FAST)
