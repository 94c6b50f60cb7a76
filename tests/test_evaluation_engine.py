"""utils/evaluation/engine.py: the engine's counting (white-box and transfer), the ε sweep's numbers, and
the trust checks as it runs them, on tiny hand-made models."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import utils.evaluation.engine
from tests.helpers import Tiny, markdown_tables, tiny_split
from utils.attacks.registry import Attack, build_attack
from utils.data.splits import Split
from utils.evaluation.engine import Evaluation
from utils.evaluation.output import results_json, sweep_table
from utils.evaluation.results import Report


def test_white_box_attacks_whole_batches_and_masks_the_clean_mistakes():
    """Every batch is attacked whole, so every attack call sees the same shape; an example the
    model misclassifies clean is never robust, whatever the attack made of it."""
    model = Tiny("plain").eval()
    split = tiny_split(64)
    x = split.images.float() / 255
    with torch.no_grad():
        correct = model(x).argmax(dim=1) == split.labels
    assert 0 < int(correct.sum()) < 64  # the test needs both kinds
    seen = []

    def run(net, xb, yb, eps):
        seen.append(yb.clone())
        return xb.flip(0)  # another example's image: broken where that one's class differs

    spy = Attack(name="spy", norm="linf", epsilon=1.0, minimum_norm=False, budget="linf", run=run)
    engine = Evaluation({"m": model}, split, batch_size=16, device="cpu", progress=False,
                           report=Report(echo=False))
    result = engine.run([spy])["m"]
    assert [len(yb) for yb in seen] == [16] * 4
    assert torch.equal(torch.cat(seen), split.labels)
    assert not (result.robust["spy"] & ~correct).any()
    # Each attacked batch is scored on its own: recompute the mask from the same flipped batches.
    with torch.no_grad():
        adv_right = torch.cat([model(x[k: k + 16].flip(0)).argmax(dim=1) for k in range(0, 64, 16)]) == split.labels
    assert torch.equal(result.robust["spy"], correct & adv_right)
    assert (correct & ~adv_right).any() and (~correct & adv_right).any()  # both rules are exercised


def test_the_split_moves_to_the_device_once(monkeypatch):
    """Every pass (the checks, each target's clean pass, each attack) batches the one device copy."""
    moved, passes = [], []
    real_to, real_loader = Split.to, utils.evaluation.engine.BatchLoader
    monkeypatch.setattr(Split, "to", lambda split, device: moved.append(torch.device(device)) or real_to(split, device))
    monkeypatch.setattr(utils.evaluation.engine, "BatchLoader",
                        lambda split, *a, **k: passes.append(split) or real_loader(split, *a, **k))
    engine = Evaluation({"a": Tiny().eval(), "b": Tiny().eval()}, tiny_split(32), batch_size=16, device="cpu",
                        progress=False, report=Report(echo=False))
    engine.run([build_attack("pgd1"), build_attack("l2-pgd1")])
    assert moved == [torch.device("cpu")]
    assert len(passes) == 7 and all(split is engine.split for split in passes)  # 1 + 2 clean + 2 × 2 attacks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_engine_counts_what_a_cpu_engine_counts():
    torch.manual_seed(0)
    model, split = Tiny().eval(), tiny_split(48)
    results = {}
    for device in ("cpu", "cuda"):
        engine = Evaluation({"m": model.to(device)}, split, batch_size=16, device=device, progress=False,
                            report=Report(echo=False))
        assert engine.split.images.device.type == device
        results[device] = engine.run([build_attack("pgd3", random_start=False)])["m"]
    cuda, cpu = results["cuda"], results["cpu"]
    assert cuda.clean.device.type == cuda.robust["pgd3"].device.type == "cpu" and cuda.clean.shape == (48,)
    assert not (cuda.robust["pgd3"] & ~cuda.clean).any()
    # Other kernels, other rounding: an example at a decision boundary may go either way.
    assert (cuda.clean != cpu.clean).sum() <= 2
    assert abs(int(cuda.robust["pgd3"].sum()) - int(cpu.robust["pgd3"].sum())) <= 2


def test_transfer_crafts_each_batch_once_for_all_targets():
    """Transfer: one run of the attack per batch, on the surrogate, over every example, and the
    very tensor it returns is what each target is scored on."""
    split = tiny_split(32)
    x, y = split.images.float() / 255, split.labels
    targets = {"a": Tiny().eval(), "b": Tiny().eval()}
    surrogate = Tiny().eval()
    crafted, attacked = [], []

    def run(net, xb, yb, eps):
        assert net is surrogate
        attacked.append(yb.clone())
        crafted.append(1 - xb)  # the negative image: in [0, 1] and within ε = 1
        return crafted[-1]

    spy = Attack(name="spy", norm="linf", epsilon=1.0, minimum_norm=False, budget="linf", run=run)
    engine = Evaluation(targets, split, batch_size=16, device="cpu", surrogate=surrogate, progress=False,
                           report=Report(echo=False))
    engine.prepare()
    fed = {n: [] for n in targets}
    for n, model in targets.items():
        model.register_forward_pre_hook(lambda module, inputs, n=n: fed[n].append(inputs[0]))
    results = engine.run([spy])

    assert len(crafted) == 2  # two batches, whatever the number of targets
    assert torch.equal(torch.cat(attacked), y)  # transfer attacks every example, right or wrong
    for n in targets:
        assert len(fed[n]) == 2 and all(a is b for a, b in zip(fed[n], crafted)), n
    expected = {}
    for n, model in targets.items():
        with torch.no_grad():
            expected[n] = (model(x).argmax(1) == y) & (model(1 - x).argmax(1) == y)
        assert torch.equal(results[n].robust["spy"], expected[n]), n
    assert not torch.equal(expected["a"], expected["b"])  # each target is scored on its own


class _Threshold(nn.Module):
    """Class 0 where the mean pixel exceeds ``level``, else 1 (logits ±Σ(x − level)).

    Moving every pixel by ε against the sign of the gradient is the L∞ attack that shifts the
    mean most, so a sample is broken at ε exactly when |mean(x) − level| < ε."""

    def __init__(self, level: float):
        super().__init__()
        self.level = level

    def forward(self, x):
        f = (x - self.level).flatten(1).sum(1)
        return torch.stack([f, -f], dim=1)


def test_eps_sweep_numbers_are_the_known_robust_accuracies():
    """Images with mean (128 + o)/255, o = −12 … 11, around two thresholds 0.5 and 0.5 + 3/255:
    the L∞ distance to each boundary is |o + ½ − shift|/255, never on the 1/255 grid of the
    budgets, and PGD-8 (steps ε/4, so every coordinate ends at ±ε from any start) reaches it
    exactly when ε exceeds it. Some labels are wrong: those are never robust."""
    offsets = torch.arange(-12, 12)
    checker = torch.tensor([[20, -20], [-20, 20]]).repeat(2, 2)  # zero-mean texture
    images = (128 + offsets.view(-1, 1, 1, 1) + checker).to(torch.uint8)
    labels = (offsets < 0).long()  # class 0 above 0.5
    labels[::5] = 1 - labels[::5]
    split = Split(images, labels)
    shifts = {"mid": 0, "high": 3}  # the threshold in units of 1/255 above 0.5
    targets = {name: _Threshold(0.5 + shift / 255) for name, shift in shifts.items()}

    table = build_attack("pgd8")  # ε = 8/255
    epsilons = [0.0, 2 / 255, 8 / 255, 12 / 255]
    engine = Evaluation(targets, split, batch_size=10, device="cpu", progress=False, report=Report(echo=False))
    results = engine.run([table], [table], epsilons)
    data = results_json([results[n] for n in targets], [table], {}, [table])
    (sweep_rows,) = markdown_tables(sweep_table([results[n] for n in targets], [table]))
    assert list(sweep_rows[0]) == ["model", "attack", "ε=0", "ε=2/255", "ε=8/255", "ε=12/255"]

    for (name, shift), entry, row in zip(shifts.items(), data["models"], sweep_rows):
        margin = offsets + 0.5 - shift  # in units of 1/255, positive on class 0's side
        correct = (margin > 0).long() == 1 - labels
        expected = {e: correct & (margin.abs() / 255 > e) for e in epsilons}
        accuracies = [100 * float(expected[e].float().mean()) for e in epsilons]
        assert len(set(accuracies)) == len(epsilons), accuracies  # every budget tells something apart
        for e in epsilons:
            assert torch.equal(results[name].sweep["pgd8"][e], expected[e]), (name, e)
        assert torch.equal(results[name].robust["pgd8"], expected[8 / 255])
        assert entry["name"] == name and entry["attacks"]["pgd8"] == pytest.approx(accuracies[2])
        swept = entry["eps_sweep"]["pgd8"]
        assert swept["epsilon"] == pytest.approx(epsilons)
        assert swept["accuracy"] == pytest.approx(accuracies)
        assert len(swept["seconds"]) == len(epsilons)
        assert row["model"] == name and row["attack"] == "pgd8"
        assert [row[k] for k in list(row)[2:]] == [f"{a:.2f}" for a in accuracies]


def _warnings_for(kind: str, attacks=("pgd1",)):
    report = Report(echo=False)
    engine = Evaluation({kind: Tiny(kind)}, tiny_split(), batch_size=8, device="cpu", progress=False,
                           report=report)
    engine.run([build_attack(a) for a in attacks])
    return report.messages


def test_healthy_model_raises_no_warning():
    assert _warnings_for("plain") == []


@pytest.mark.parametrize("kind, fragment", [
    ("round", "zero input gradient"),
    ("noisy", "randomized defense"),
    ("softmax", "probability distribution"),
    ("self-training", "train mode"),
])
def test_trust_checks_fire(kind, fragment):
    messages = _warnings_for(kind)
    assert any(fragment in m and m.startswith(kind) for m in messages), messages


def test_autoattack_own_warnings_are_kept():
    def run(attack):
        # A noisy model whose bias makes every example right: AutoAttack runs on all of them
        # (a random model could get none right).
        model = Tiny("noisy")
        with torch.no_grad():
            model.fc.bias.copy_(10.0 * F.one_hot(torch.tensor(3), 10))
        split = Split(tiny_split().images, torch.full((16,), 3))
        report = Report(echo=False)
        engine = Evaluation({"noisy": model}, split, batch_size=8, device="cpu", progress=False, report=report)
        assert engine.run([attack])["noisy"].clean.all()
        return report.messages

    # AutoAttack's own check, in its own words (version="rand"), under the attack's label.
    messages = run(build_attack("aa", version="custom", attacks_to_run=["apgd-ce"], n_iter=2))
    assert any(m.startswith("aa (noisy): ") and 'randomized defense! Please use version="rand"' in m
               for m in messages), messages
    # Without AutoAttack the same model draws the engine's own warning, once, and nothing labelled aa.
    messages = run(build_attack("pgd1"))
    assert len(messages) == 1 and messages[0].startswith("noisy: ") and "randomized" in messages[0], messages
    assert not any(m.startswith("aa") for m in messages), messages


