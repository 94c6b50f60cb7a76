"""utils/mi/release_compat.py: the quirk flags, and the release's forward passes replayed for BatchNorm."""
import copy

import pytest
import torch
import torch.nn as nn

import train_MI_estimator
import train_MIAT
from models import get_model
from models.estimator import build_estimator
from utils.mi.release_compat import (
    QUIRK_FLAGS,
    BatchNormReplay,
    Quirks,
    release_stage2_passes,
    release_stage3_passes,
)
from utils.namid import freeze, namid_objective

QUIRK_NAMES = [flag.removeprefix("release-").replace("-", "_") for flag in QUIRK_FLAGS]


def _bn_state(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k}


def _same_bn(a, b):
    sa, sb = _bn_state(a), _bn_state(b)
    return sa.keys() == sb.keys() and all(torch.allclose(sa[k], sb[k], rtol=0, atol=1e-6) for k in sa)


@pytest.mark.parametrize("script", [train_MIAT, train_MI_estimator])
def test_release_compat_is_the_union_of_the_quirk_flags(script):
    base = ["--mi-dir", "x"] if script is train_MIAT else ["--pre-target", "x"]
    assert script.parse_args(base).quirks == Quirks()
    assert script.parse_args([*base, "--release-compat"]).quirks == Quirks.release()
    for flag, name in zip(QUIRK_FLAGS, QUIRK_NAMES):
        quirks = script.parse_args([*base, f"--{flag}"]).quirks
        assert [f for f in QUIRK_NAMES if getattr(quirks, f)] == [name]


def test_every_quirk_field_has_a_flag():
    assert sorted(QUIRK_NAMES) == sorted(Quirks.__dataclass_fields__)


def test_stage3_sequence():
    x, x_adv = torch.zeros(1), torch.ones(1)
    names = lambda seq: ["x" if t is x else "x_adv" for t in seq]  # noqa: E731
    assert names(release_stage3_passes(x, x_adv, True)) == ["x_adv", "x", "x_adv", "x", "x_adv", "x_adv", "x"]
    assert names(release_stage3_passes(x, x_adv, False)) == ["x_adv", "x", "x_adv"]


@pytest.mark.parametrize("counts,natural,adversarial", [
    ((5, 3, 2), ["nat", "nat", "adv"] * 2, ["adv", "nat"] * 2),
    ((5, 5, 0), ["nat", "nat", "adv"], ["adv", "nat"]),
    ((5, 0, 5), ["nat", "nat", "adv"], ["adv", "nat"]),
    ((0, 0, 0), ["nat"], ["adv"]),
])
def test_stage2_sequence(counts, natural, adversarial):
    assert release_stage2_passes(*counts) == {"natural": natural, "adversarial": adversarial}


def test_replay_gives_the_statistics_of_the_sequence_and_keeps_the_graph():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).train()
    reference = copy.deepcopy(net)
    a, b = torch.randn(8, 1, 6, 6), 2 + 3 * torch.randn(8, 1, 6, 6)
    replay = BatchNormReplay(net)
    loss = net(a).sum() + net(b).square().sum()  # the step's own passes: a, then b
    replay.run([b, a, b, b])
    with torch.no_grad():
        for x in (b, a, b, b):
            reference(x)
    assert _same_bn(net, reference)
    loss.backward()  # the replay left the step's graph usable
    assert all(p.grad is not None for p in net.parameters())


def test_stage3_passes_leave_the_release_statistics_and_the_same_gradients():
    torch.manual_seed(1)
    model = get_model("smallcnn", 10, 3).train()
    for m in model.modules():  # SmallCNN's dropout would draw other masks in each run
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    nn.init.normal_([m for m in model.modules() if isinstance(m, nn.Linear)][-1].weight)
    est_n, est_a = (freeze(build_estimator(3, 10, 16)) for _ in range(2))
    x = torch.rand(32, 3, 32, 32)
    with torch.no_grad():
        y = model(x).argmax(1)  # all correct on x
    x_adv = (x + 0.3 * torch.rand_like(x)).clamp(0, 1)
    from tests.test_namid import objective_args

    results = {}
    for passes in (False, True):
        m = copy.deepcopy(model)
        loss, _, extra = namid_objective(m, est_n, est_a, x, x_adv, y, **objective_args(quirks=Quirks(passes=passes)))
        loss.backward()
        results[passes] = (m, loss.detach(), torch.cat([p.grad.flatten() for p in m.parameters()]), extra)
    assert results[True][3]["w_size"] > 0
    assert torch.equal(results[True][1], results[False][1])
    assert torch.allclose(results[True][2], results[False][2], rtol=1e-5, atol=1e-7)
    release = copy.deepcopy(model)
    with torch.no_grad():
        for v in (x_adv, x, x_adv, x, x_adv, x_adv, x):
            release(v)
    assert _same_bn(results[True][0], release)
    assert not _same_bn(results[False][0], release)
