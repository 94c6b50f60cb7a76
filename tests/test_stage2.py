"""What the two stage-2 scripts share (utils/training/stage2.py): the adversarial batch, the four MI
vectors, the release's BatchNorm passes, the evaluation's table, the one-line summary and the
bar chart. The scripts themselves are tested in tests/test_train_MI_estimator.py."""
import copy

import pytest
import torch
import torch.nn as nn

import utils.training.stage2 as stage2
from models import get_model
from models.estimator import build_estimator
from tests.test_release_compat import _same_bn
from utils.mi.objectives import MITable
from utils.mi.patterns import select_samples
from utils.mi.release_compat import Quirks
from utils.training.fast import FastPath
from utils.training.loop import TrainAttack
from utils.training.setup import DeviceSpec
from utils.training.stage2 import AdvBatch, ReleasePasses, Stage2Setup, Stage2Spec, mi_vectors


def test_mi_vectors_reuse_local_features_and_match_mi():
    torch.manual_seed(1)
    ests = {k: build_estimator(3, 10, hidden=16).eval() for k in ("natural", "adversarial")}
    x, n = torch.rand(6, 3, 32, 32), torch.rand(6, 3, 32, 32) * 0.1
    g_nat, g_adv = torch.randn(6, 10), torch.randn(6, 10)
    b = stage2.AdvBatch(x, torch.zeros(6, dtype=torch.long), x + n, n, g_nat, g_nat, g_adv, g_adv)
    calls = []
    for e in ests.values():
        e.local.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        got = stage2.mi_vectors(ests, b, "dv")
        want = (ests["natural"].mi(x, g_nat), ests["natural"].mi(x, g_adv),
                ests["adversarial"].mi(n, g_nat), ests["adversarial"].mi(n, g_adv))
    assert len(calls) == 2 + 4  # mi_vectors: one local pass per estimator; the reference: four
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5)


def test_stage2_passes_leave_the_release_statistics():
    torch.manual_seed(2)
    ests = nn.ModuleDict({k: build_estimator(3, 10, 16) for k in ("natural", "adversarial")}).train()
    reference = copy.deepcopy(ests)
    x = torch.rand(12, 3, 32, 32)
    n = 0.05 * torch.randn_like(x)
    g_nat = torch.randn(12, 10)
    g_adv = torch.cat([torch.randn(6, 10), g_nat[6:]])  # the last six keep their prediction
    y = g_nat.argmax(1)
    b = AdvBatch(x, y, x + n, n, g_nat, g_nat, g_adv, g_adv)
    sel = select_samples(g_nat, g_adv, y)
    assert sel.right.any() and sel.wrong.any()
    passes = ReleasePasses(ests)
    sum(v.sum() for v in mi_vectors(ests, b, "dv")).backward()
    passes.finish(b, sel)
    with torch.no_grad():
        for kind, pattern in (("natural", x), ("adversarial", n)):
            order = {"natural": [g_nat, g_nat, g_adv] * 2, "adversarial": [g_adv, g_nat] * 2}[kind]
            for g in order:
                reference[kind].local(pattern)
                reference[kind].global_(g)
    assert _same_bn(ests, reference)


# --- direct tests of the other helpers --------------------------------------------------------


def _target(seed=0):
    """A SmallCNN whose zero-initialised last layer is randomised, so that its input gradient is not zero."""
    torch.manual_seed(seed)
    target = get_model("smallcnn", 10, 3).eval()
    nn.init.normal_([m for m in target.modules() if isinstance(m, nn.Linear)][-1].weight)
    return target


ATTACK = TrainAttack(epsilon=0.1, step_size=0.025, num_steps=1, eval_steps=1, distance="l_inf")


def _setup(target, batches) -> Stage2Setup:
    """A stage-2 setup around ``target`` whose evaluation split is ``batches``."""
    spec = Stage2Spec(model_dir="", data=None, where=DeviceSpec(), arch="smallcnn", pre_target="", fast=FastPath(),
                      attack=ATTACK, layer=None, mode="dv", quirks=Quirks(), progress=False)
    return Stage2Setup(torch.device("cpu"), None, None, batches, None, 0, target, spec)


@pytest.mark.parametrize("layer", [None, "layer3"])
def test_attack_batch_holds_the_patterns_and_the_targets_outputs(layer):
    target = _target()
    x, y = torch.rand(4, 3, 32, 32), torch.arange(4)
    b = stage2.attack_batch(target, x, y, ATTACK, layer, num_steps=2)
    assert torch.equal(b.x, x) and torch.equal(b.y, y)
    assert torch.equal(b.n, b.x_adv - x)
    assert (b.x_adv - x).abs().max() <= 0.1 + 1e-6 and b.x_adv.min() >= 0 and b.x_adv.max() <= 1
    assert (b.x_adv != x).any()
    assert not any(t.requires_grad for t in b)
    with torch.no_grad():
        for logits, g, v in ((b.logits_nat, b.g_nat, x), (b.logits_adv, b.g_adv, b.x_adv)):
            want, feats = target(v, return_features=True)
            assert torch.equal(logits, want)
            if layer is None:
                assert g is logits
            else:
                assert torch.equal(g, feats[layer])


@pytest.mark.parametrize("start,expected", [(False, "uniform"), (True, "normal")])
def test_attack_batch_attacks_with_the_flags_and_the_release_start(monkeypatch, start, expected):
    seen = []

    def spy(model, x, y, epsilon, step_size, num_steps, norm, **kwargs):
        seen.append((epsilon, step_size, num_steps, norm, kwargs))
        return x + 0.01

    monkeypatch.setattr(stage2, "pgd", spy)
    target = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    x = torch.rand(2, 3, 2, 2)
    b = stage2.attack_batch(target, x, torch.zeros(2, dtype=torch.long), ATTACK, None, 7, normal_start=start)
    assert seen == [(0.1, 0.025, 7, "l_inf", {"random_start": expected})]
    assert torch.allclose(b.n, torch.full_like(x, 0.01))


def test_global_batch_in_one_process_is_the_batch_itself():
    b = AdvBatch(*(torch.rand(3, 2) for _ in AdvBatch._fields))
    got = stage2.global_batch(b)
    assert isinstance(got, AdvBatch) and all(g is t for g, t in zip(got, b))


def _loader():
    target = _target(1)
    batches = []
    for _ in range(2):
        x = torch.rand(6, 3, 32, 32)
        with torch.no_grad():
            y = target(x).argmax(1)
        y[0] = (y[0] + 1) % 10  # one wrong on x in each batch
        batches.append((x, y))
    return target, batches


def _flip(monkeypatch):
    """A deterministic 'attack': x̃ = 1 − x (no budget: it only has to change some predictions)."""
    monkeypatch.setattr(stage2, "pgd", lambda model, x, y, *args, **kwargs: 1 - x)


def test_evaluate_mi_table_is_the_table_and_the_accuracies_over_the_evaluation_split(monkeypatch):
    _flip(monkeypatch)
    target, batches = _loader()
    setup = _setup(target, batches)
    torch.manual_seed(2)
    ests = nn.ModuleDict({k: build_estimator(3, 10, hidden=16) for k in ("natural", "adversarial")}).train()
    got = stage2.evaluate_mi_table(setup, ests)
    assert ests.training  # evaluated in eval mode, then put back

    ests.eval()
    table, clean, robust = MITable(), 0, 0
    with torch.no_grad():
        for x, y in batches:
            b = stage2.attack_batch(target, x, y, ATTACK, None, 1)
            sel = select_samples(b.logits_nat, b.logits_adv, b.y)
            table.update(*mi_vectors(ests, b, "dv", estimate=True), sel)
            clean += int((b.logits_nat.argmax(1) == y).sum())
            robust += int((b.logits_adv.argmax(1) == y).sum())
    want = table.result()
    assert want["n_right"] > 0 and want["n_wrong"] > 0
    assert set(got) == {*want, "clean_acc", "pgd_acc"}
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert got["clean_acc"] == pytest.approx(100 * clean / 12) and got["pgd_acc"] == pytest.approx(100 * robust / 12)


def test_evaluate_standard_mi_is_the_mean_standard_mi_over_the_evaluation_split(monkeypatch):
    _flip(monkeypatch)
    target, batches = _loader()
    setup = _setup(target, batches)
    torch.manual_seed(3)
    est = build_estimator(3, 10, hidden=16).train()
    got = stage2.evaluate_standard_mi(setup, est)
    assert est.training

    est.eval()
    with torch.no_grad():
        bs = [stage2.attack_batch(target, x, y, ATTACK, None, 1) for x, y in batches]
        mi_x = torch.cat([est.mi(b.x, b.g_nat, "dv", estimate=True) for b in bs]).double().mean()
        mi_xadv = torch.cat([est.mi(b.x_adv, b.g_adv, "dv", estimate=True) for b in bs]).double().mean()
    assert got["standard_mi_x"] == pytest.approx(float(mi_x), rel=1e-6)
    assert got["standard_mi_xadv"] == pytest.approx(float(mi_xadv), rel=1e-6)
    assert set(got) == {"standard_mi_x", "standard_mi_xadv", "clean_acc", "pgd_acc"}


def test_summarize_puts_the_table_on_one_line():
    record = {"n_right": 3, "n_wrong": 2, "natural_mi_x_wrong": 1.23456, "natural_mi_xadv_wrong": 0.5,
              "adversarial_mi_x_wrong": None, "adversarial_mi_xadv_wrong": -2.0}
    assert stage2.summarize(record) == "|R|=3 |W|=2  W: nat_mi x/x\u0303=1.23/0.5 adv_mi x/x\u0303=n/a/-2"
    assert stage2.summarize({"standard_mi_x": 0.25, "standard_mi_xadv": None}) == "std_mi x/x\u0303=0.25/n/a"


TABLE = {f"{kind}_mi_{v}_{s}": 0.1 * i for i, (kind, v, s) in enumerate(
    (kind, v, s) for kind in ("natural", "adversarial") for v in ("x", "xadv") for s in ("right", "wrong"))}


@pytest.mark.parametrize("record", [
    {"epoch": 1, "n_right": 2, "n_wrong": 1, **TABLE},
    {"epoch": 1, "n_right": 0, "n_wrong": 0},  # empty sets: no values, drawn as NaN
    {"epoch": 2, "standard_mi_x": 0.3, "standard_mi_xadv": None},
], ids=["fig4", "empty-sets", "standard-mi"])
def test_plot_mi_table_writes_one_png(tmp_path, record):
    path = tmp_path / "mi_table.png"
    stage2.plot_mi_table(record, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(tmp_path.iterdir()) == [path]  # written atomically: no temporary file left behind
