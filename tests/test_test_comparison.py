"""test_comparison.py and utils/evaluation.py: tables, worst case, transfer, trust checks, bad input.

A SmallCNN is trained for a few clean epochs on synthetic 3×32×32 data once per module;
the script runs in-process on its first test images with short attacks."""
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train_standard
from models import get_model
from tests.helpers import assert_user_error, run_script
from utils import evaluation as ev
from utils.attacks.registry import Attack, build_attack, robust_mask
from utils.data import load_splits
from utils.device import seed_everything
from utils.splits import Split

ROOT = Path(__file__).resolve().parents[1]
# Under pytest this file is the module "test_comparison", so the script is loaded by another name.
SCRIPT = "comparison_script"
DATA = ["--dataset", "synthetic", "--test-limit", "64", "--no-progress"]


def _script():
    if SCRIPT not in sys.modules:
        spec = importlib.util.spec_from_file_location(SCRIPT, ROOT / "test_comparison.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[SCRIPT] = module
        spec.loader.exec_module(module)
    return sys.modules[SCRIPT]


def _run(capsys, argv):
    _script()
    return run_script(capsys, SCRIPT, [*DATA, *argv])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run folder holding best_model.pth of a SmallCNN trained well above chance (10 %)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train_standard.main(["--dataset", "synthetic", "--arch", "smallcnn", "--train-limit", "256", "--test-limit", "64",
                         "--epochs", "5", "--warm-up-epochs", "5", "--lr", "0.05", "--lr-milestones",
                         "--batch-size", "32", "--eval-steps", "1", "--no-progress", "--model-dir", str(run)])
    assert (run / "best_model.pth").is_file()
    return run


@pytest.fixture(scope="module")
def test_split():
    splits, _ = load_splits("synthetic", "data", test_limit=64, seed=0)
    return splits["test"]


def _model(run) -> nn.Module:
    model = get_model("smallcnn", 10, 3)
    model.load_state_dict(torch.load(run / "best_model.pth", weights_only=True))
    return model.eval()


def _tables(text):
    """Markdown tables of ``text`` as lists of {column: cell}."""
    tables, block = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            tables.append([dict(zip(block[0], row)) for row in block[2:]])
            block = []
    return tables


def _json(path):
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------- the script end to end


def test_every_attack_keeps_robust_below_clean_and_json_matches_markdown(trained, tmp_path, capsys):
    attacks = ["pgd5", "l2-pgd5", "cw", "ddn", "mifgsm"]
    code, out, err = _run(capsys, ["--model-dir", trained, "--arch", "smallcnn", "--attacks", ",".join(attacks),
                                   "--n-examples", "32", "--batch-size", "16", "--out", tmp_path / "r.json",
                                   "--md", tmp_path / "r.md"])
    assert code == 0, err
    data = _json(tmp_path / "r.json")
    (model,) = data["models"]
    assert model["n"] == 32 and model["clean"] > 50  # the model learned: chance is 10 %
    for name in attacks:
        assert model["attacks"][name] <= model["clean"], name
        assert model["worst_case"] <= model["attacks"][name], name
        assert model["attacks"][name] == pytest.approx(100 * model["correct"][name] / 32)
        seconds = model["seconds"][name]  # recorded, never judged: wall times vary
        assert isinstance(seconds, (int, float)) and seconds >= 0
    assert model["attacks"]["pgd5"] < model["clean"]  # the attacks do something
    assert model["worst_case"] == pytest.approx(100 * model["correct"]["worst_case"] / 32)

    settings = data["settings"]
    assert settings["n_examples"] == 32 and settings["dataset"] == "synthetic" and settings["mode"] == "white-box"
    assert settings["attacks"]["pgd5"]["epsilon"] == pytest.approx(8 / 255)
    assert settings["attacks"]["l2-pgd5"]["epsilon"] == settings["attacks"]["cw"]["epsilon"] == 0.5
    assert settings["versions"]["torch"] == torch.__version__
    assert data["warnings"] == []  # a healthy model raises no trust warning

    assert (tmp_path / "r.md").read_text() == out
    (rows, *_) = _tables(out)
    assert list(rows[0]) == ["model", "clean", *attacks, "worst case"]
    row = rows[0]
    assert row["model"] == trained.name
    assert float(row["clean"]) == pytest.approx(model["clean"], abs=0.0051)
    assert float(row["worst case"]) == pytest.approx(model["worst_case"], abs=0.0051)
    for name in attacks:
        assert float(row[name]) == pytest.approx(model["attacks"][name], abs=0.0051)


def test_worst_case_is_the_and_of_the_per_attack_masks(trained, test_split):
    model = _model(trained)
    split = ev.first_examples(test_split, 24)
    attacks = [build_attack("pgd3"), build_attack("mifgsm", steps=3), build_attack("ddn", steps=5)]
    engine = ev.Evaluation({"m": model}, split, batch_size=24, device="cpu", seed=0, progress=False,
                           report=ev.Report(echo=False))
    result = engine.run(attacks)["m"]
    masks = [result.robust[a.name] for a in attacks]
    assert torch.equal(result.worst, result.clean & masks[0] & masks[1] & masks[2])
    row = result.table_row()
    assert row["worst case"] == pytest.approx(100 * float(result.worst.float().mean()))
    assert all(row["worst case"] <= row[a.name] <= row["clean"] for a in attacks)
    assert row["worst case"] < row["clean"]

    x = split.images.float() / 255
    y = split.labels
    for attack in attacks:
        # The engine's counting, with the clean pass reused, must be the registry's rule.
        seed_everything(0)
        x_adv = attack(model, x, y)
        assert torch.equal(result.robust[attack.name], robust_mask(model, x, y, x_adv, attack)), attack.name


def test_white_box_attacks_only_the_correctly_classified_examples():
    model = _Tiny("plain").eval()
    split = _tiny_split(64)
    x = split.images.float() / 255
    with torch.no_grad():
        correct = model(x).argmax(dim=1) == split.labels
    assert 0 < int(correct.sum()) < 64  # the test needs both kinds
    seen = []

    def run(net, xb, yb, eps):
        seen.append(yb.clone())
        return xb.flip(0)  # another example's image: broken where that one's class differs

    spy = Attack(name="spy", norm="linf", epsilon=1.0, minimum_norm=False, budget="linf", run=run)
    engine = ev.Evaluation({"m": model}, split, batch_size=16, device="cpu", progress=False,
                           report=ev.Report(echo=False))
    result = engine.run([spy])["m"]
    assert torch.equal(torch.cat(seen), split.labels[correct])
    assert not (result.robust["spy"] & ~correct).any()
    # Each attacked batch is scored on its own: recompute the mask from the same flipped batches.
    expected = []
    for k in range(4):
        part = slice(16 * k, 16 * (k + 1))
        keep = correct[part]
        with torch.no_grad():
            adv_right = model(x[part][keep].flip(0)).argmax(dim=1) == split.labels[part][keep]
        expected.append(torch.zeros(16, dtype=torch.bool).masked_scatter(keep, adv_right))
    assert torch.equal(result.robust["spy"], torch.cat(expected))


def test_transfer_crafts_on_the_surrogate_only(trained, tmp_path, capsys, monkeypatch):
    surrogate = get_model("smallcnn-nobn", 10, 3)
    nn.init.normal_(surrogate.classifier[-1].weight, std=0.1)  # the zero-initialised layer has no gradient
    torch.save(surrogate.state_dict(), tmp_path / "surrogate.pth")
    script = _script()
    calls = {"target": 0, "surrogate_grad": 0}

    def forbid_gradients(module, inputs):
        calls["target"] += 1
        if torch.is_grad_enabled() or inputs[0].requires_grad:
            raise AssertionError("the target was asked for a gradient in transfer mode")

    def count_gradients(module, inputs):
        calls["surrogate_grad"] += int(torch.is_grad_enabled() and inputs[0].requires_grad)

    def patched(name, num_classes=10, in_channels=3):
        model = get_model(name, num_classes, in_channels)
        model.register_forward_pre_hook(forbid_gradients if name == "smallcnn" else count_gradients)
        return model

    monkeypatch.setattr(script, "get_model", patched)
    code, out, err = _run(capsys, ["--checkpoint", trained / "best_model.pth", "--arch", "smallcnn",
                                   "--surrogate", tmp_path / "surrogate.pth", "--surrogate-arch", "smallcnn-nobn",
                                   "--attacks", "pgd3,mifgsm", "--n-examples", "16", "--out", tmp_path / "t.json"])
    assert code == 0, err
    assert calls["target"] > 0 and calls["surrogate_grad"] > 0
    data = _json(tmp_path / "t.json")
    assert data["settings"]["mode"] == "transfer"
    assert data["settings"]["surrogate"]["arch"] == "smallcnn-nobn"
    (model,) = data["models"]
    assert all(acc <= model["clean"] for acc in model["attacks"].values())
    assert "black-box" in out


def test_transfer_crafts_each_batch_once_for_all_targets():
    """Transfer: one run of the attack per batch, on the surrogate, over every example, and the
    very tensor it returns is what each target is scored on."""
    split = _tiny_split(32)
    x, y = split.images.float() / 255, split.labels
    targets = {"a": _Tiny().eval(), "b": _Tiny().eval()}
    surrogate = _Tiny().eval()
    crafted, attacked = [], []

    def run(net, xb, yb, eps):
        assert net is surrogate
        attacked.append(yb.clone())
        crafted.append(1 - xb)  # the negative image: in [0, 1] and within ε = 1
        return crafted[-1]

    spy = Attack(name="spy", norm="linf", epsilon=1.0, minimum_norm=False, budget="linf", run=run)
    engine = ev.Evaluation(targets, split, batch_size=16, device="cpu", surrogate=surrogate, progress=False,
                           report=ev.Report(echo=False))
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


def test_model_dir_prefers_target_model_then_best_model(trained, tmp_path, capsys):
    fast = ["--arch", "smallcnn", "--attacks", "pgd1", "--n-examples", "8"]
    code, _, err = _run(capsys, ["--model-dir", trained, *fast, "--out", tmp_path / "a.json"])
    assert code == 0, err
    assert _json(tmp_path / "a.json")["models"][0]["checkpoint"].endswith("best_model.pth")

    both = tmp_path / "both"
    both.mkdir()
    shutil.copy(trained / "best_model.pth", both / "best_model.pth")
    (both / "target_model.pth").write_bytes(b"not a checkpoint")
    assert_user_error(_run(capsys, ["--model-dir", both, *fast]), "target_model.pth")  # read first
    shutil.copy(trained / "best_model.pth", both / "target_model.pth")
    code, _, err = _run(capsys, ["--model-dir", both, *fast, "--out", tmp_path / "b.json"])
    assert code == 0, err
    assert _json(tmp_path / "b.json")["models"][0]["checkpoint"].endswith("target_model.pth")

    (tmp_path / "empty").mkdir()
    assert_user_error(_run(capsys, ["--model-dir", tmp_path / "empty", *fast]), "target_model.pth", "best_model.pth")


def test_wrapped_checkpoints_load_as_the_plain_one(trained, tmp_path, capsys):
    """State dicts saved through DataParallel/DDP ("module.") or torch.compile ("_orig_mod.")
    give the plain checkpoint's numbers."""
    state = torch.load(trained / "best_model.pth", weights_only=True)
    argv = ["--arch", "smallcnn", "--checkpoint", trained / "best_model.pth", "--name", "plain"]
    for prefix in ("module.", "_orig_mod.", "module._orig_mod."):
        path = tmp_path / f"{prefix.replace('.', '_')}.pth"
        torch.save({prefix + k: v for k, v in state.items()}, path)
        argv += ["--checkpoint", path, "--name", prefix]
    code, _, err = _run(capsys, [*argv, "--attacks", "pgd1", "--n-examples", "16", "--out", tmp_path / "w.json"])
    assert code == 0, err
    models = _json(tmp_path / "w.json")["models"]
    assert len(models) == 4 and models[0]["clean"] > 20  # chance is 10 %
    assert all(m["clean"] == models[0]["clean"] and m["attacks"] == models[0]["attacks"] for m in models)


def test_repeated_checkpoints_take_the_name_and_arch_after_them(trained, tmp_path, capsys):
    other = tmp_path / "copy.pth"
    shutil.copy(trained / "best_model.pth", other)
    code, out, err = _run(capsys, ["--arch", "smallcnn", "--checkpoint", trained / "best_model.pth", "--name", "first",
                                   "--checkpoint", other, "--name", "second", "--attacks", "pgd1",
                                   "--n-examples", "8", "--out", tmp_path / "c.json"])
    assert code == 0, err
    assert [m["name"] for m in _json(tmp_path / "c.json")["models"]] == ["first", "second"]
    assert [r["model"] for r in _tables(out)[0]] == ["first", "second"]
    # Same weights, same examples, same seed: the same numbers.
    a, b = _json(tmp_path / "c.json")["models"]
    assert a["attacks"] == b["attacks"] and a["clean"] == b["clean"]

    script = _script()
    args = script.parse_args(["--arch", "smallcnn", "--checkpoint", "a.pth", "--name", "A",
                              "--checkpoint", "b.pth", "--arch", "vgg19", "--model_dir", "d"])
    specs = [(m["path"], m["name"], m["arch"]) for m in args.models]
    assert specs == [("a.pth", "A", None), ("b.pth", None, "vgg19"), ("d", None, None)]
    assert args.arch == "smallcnn"  # the default for models that name none
    assert_user_error(_run(capsys, ["--checkpoint", trained / "best_model.pth", "--checkpoint", other,
                                    "--name", "x", "--name", "y"]), "--name")
    assert_user_error(_run(capsys, ["--arch", "smallcnn", "--checkpoint", other, "--name", "same",
                                    "--checkpoint", other, "--name", "same"]), "same")


def test_n_examples_takes_the_first_n_in_order(test_split, tmp_path, capsys):
    labels = test_split.labels
    n = 10
    # A network that always answers class c: its accuracy is the share of c among the examples.
    c = max(range(10), key=lambda k: abs(float((labels[:n] == k).float().mean() - (labels[-n:] == k).float().mean())))
    model = get_model("smallcnn", 10, 3)
    with torch.no_grad():
        model.classifier[-1].weight.zero_()
        model.classifier[-1].bias.copy_(F.one_hot(torch.tensor(c), 10).float() * 10)
    torch.save(model.state_dict(), tmp_path / "const.pth")
    assert torch.equal(ev.first_examples(test_split, n).labels, labels[:n])

    code, _, err = _run(capsys, ["--checkpoint", tmp_path / "const.pth", "--arch", "smallcnn", "--attacks", "pgd1",
                                 "--n-examples", n, "--out", tmp_path / "n.json"])
    assert code == 0, err
    data = _json(tmp_path / "n.json")
    expected = 100 * float((labels[:n] == c).float().mean())
    assert expected != 100 * float((labels[-n:] == c).float().mean())
    assert data["models"][0]["clean"] == pytest.approx(expected)
    assert data["settings"]["n_examples"] == n
    # Its output does not depend on the input: every gradient is zero, which must be flagged.
    assert any("zero input gradient" in w for w in data["warnings"])
    assert "zero input gradient" in err


BAD_INPUT = ["unknown attack", "missing checkpoint", "mismatched arch", "too many examples", "no model",
             "sweep mixing norms", "linf epsilon on the 0-255 scale", "linf sweep on the 0-255 scale",
             "custom AutoAttack", "--out is a folder", "checkpoint is a folder", "plot without a sweep",
             "surrogate of another arch"]


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2(trained, tmp_path, capsys, case):
    ok = ["--checkpoint", trained / "best_model.pth", "--arch", "smallcnn", "--attacks", "pgd1"]
    argv, fragments = {
        "unknown attack": ([*ok, "--attacks", "pgd5,foo"], ["'foo'"]),
        "missing checkpoint": (["--checkpoint", tmp_path / "missing.pth", "--arch", "smallcnn"], ["no checkpoint"]),
        "mismatched arch": (["--checkpoint", trained / "best_model.pth", "--arch", "resnet18"],
                            ["does not fit", "resnet18", "config.json says --arch smallcnn"]),
        "too many examples": ([*ok, "--n-examples", "65"], ["--n-examples 65", "64"]),
        "no model": (["--attacks", "pgd1"], ["no model"]),
        "sweep mixing norms": ([*ok, "--sweep-attacks", "pgd2,ddn", "--eps-sweep", "0,0.1"], ["different norms"]),
        "linf epsilon on the 0-255 scale": ([*ok, "--epsilon", "8"], ["--epsilon", "8/255"]),
        "linf sweep on the 0-255 scale": ([*ok, "--eps-sweep", "0,4,8"], ["--eps-sweep 4", "4/255"]),
        "custom AutoAttack": ([*ok, "--aa-version", "custom"], ["--aa-version"]),
        "--out is a folder": ([*ok, "--out", tmp_path], ["--out", "folder"]),
        "checkpoint is a folder": (["--checkpoint", trained, "--arch", "smallcnn"], ["is a folder", "--model-dir"]),
        "plot without a sweep": ([*ok, "--plot", tmp_path / "p.png"], ["--plot", "--eps-sweep"]),
        "surrogate of another arch": ([*ok, "--surrogate", trained / "best_model.pth"],
                                      ["--surrogate", "does not fit --surrogate-arch vgg19", "config.json"]),
    }[case]
    assert_user_error(_run(capsys, argv), *fragments)


def test_eps_sweep_writes_a_png_and_sweeps_l2_attacks(trained, tmp_path, capsys):
    code, out, err = _run(capsys, ["--model-dir", trained, "--arch", "smallcnn", "--attacks", "pgd2,ddn",
                                   "--eps-sweep", "0,2/255,16/255", "--n-examples", "16", "--out", tmp_path / "s.json"])
    assert code == 0, err
    png = tmp_path / "s_eps_sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = _json(tmp_path / "s.json")
    sweep = data["models"][0]["eps_sweep"]
    assert list(sweep) == ["pgd2"]  # ddn measures ε in L2: not on this L∞ sweep
    assert sweep["pgd2"]["epsilon"] == pytest.approx([0, 2 / 255, 16 / 255])
    accs = sweep["pgd2"]["accuracy"]
    assert accs[0] == data["models"][0]["clean"] and accs[-1] < accs[0]
    assert data["settings"]["eps_sweep"]["plot"] == str(png)
    assert "against ε" in out
    (_, (printed,)) = _tables(out)  # the table, then the sweep's one row: the JSON's numbers
    assert list(printed) == ["model", "attack", "ε=0", "ε=2/255", "ε=16/255"] and printed["attack"] == "pgd2"
    assert [float(printed[k]) for k in list(printed)[2:]] == pytest.approx(accs, abs=0.0051)

    # CW ignores ε while it runs: one run serves every budget, so the curve cannot rise.
    code, _, err = _run(capsys, ["--model-dir", trained, "--arch", "smallcnn", "--attacks", "cw",
                                 "--sweep-attacks", "cw", "--eps-sweep", "0.1,0.5,2", "--n-examples", "16",
                                 "--out", tmp_path / "d.json", "--plot", tmp_path / "plots" / "d.png"])
    assert code == 0, err
    assert (tmp_path / "plots" / "d.png").is_file()
    model = _json(tmp_path / "d.json")["models"][0]
    accs = model["eps_sweep"]["cw"]["accuracy"]
    assert accs == sorted(accs, reverse=True)
    assert accs[1] == model["attacks"]["cw"]  # ε 0.5 is the table's budget: reused


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
    engine = ev.Evaluation(targets, split, batch_size=10, device="cpu", progress=False, report=ev.Report(echo=False))
    results = engine.run([table], [table], epsilons)
    data = ev.results_json([results[n] for n in targets], [table], {}, [table])
    (sweep_rows,) = _tables(ev.sweep_table([results[n] for n in targets], [table]))
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


# ---------------------------------------------------------------- trust checks


class _Tiny(nn.Module):
    """A linear classifier on 3×8×8 images, with hooks for the pathologies the checks look for."""

    def __init__(self, kind: str = "plain"):
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(3 * 8 * 8, 10)

    def forward(self, x):
        if self.kind == "round":
            x = torch.round(x * 4)  # piecewise constant: zero gradient everywhere
        h = x.flatten(1)
        if self.kind == "noisy":
            h = F.dropout(h, 0.5, training=True)  # random even in eval mode
        out = self.fc(h)
        if self.kind == "softmax":
            out = out.softmax(dim=1)
        if self.kind == "self-training":
            self.train()  # a forward pass that flips the mode
        return out


def _tiny_split(n: int = 16) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8),
                 torch.randint(0, 10, (n,), generator=g))


def _warnings_for(kind: str, attacks=("pgd1",)):
    report = ev.Report(echo=False)
    engine = ev.Evaluation({kind: _Tiny(kind)}, _tiny_split(), batch_size=8, device="cpu", progress=False,
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
        # (white-box attacks skip clean mistakes, and a random model could get none right).
        model = _Tiny("noisy")
        with torch.no_grad():
            model.fc.bias.copy_(10.0 * F.one_hot(torch.tensor(3), 10))
        split = Split(_tiny_split().images, torch.full((16,), 3))
        report = ev.Report(echo=False)
        engine = ev.Evaluation({"noisy": model}, split, batch_size=8, device="cpu", progress=False, report=report)
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


def test_zero_gradient_fraction():
    x, y = _tiny_split(8).images.float() / 255, _tiny_split(8).labels
    assert ev.zero_gradient_fraction(_Tiny("round"), x, y) == 1.0
    assert ev.zero_gradient_fraction(_Tiny("plain"), x, y) == 0.0


def _result(clean, **robust):
    return ev.ModelResult("m", torch.tensor(clean, dtype=torch.bool),
                          {k: torch.tensor(v, dtype=torch.bool) for k, v in robust.items()})


def test_result_checks_flag_robust_above_clean_and_pgd_below_aa():
    attacks = [build_attack("pgd40"), build_attack("aa")]
    bad = _result([1, 0, 0, 0], pgd40=[1, 1, 0, 0], aa=[0, 0, 0, 0])
    assert any("above the clean" in m for m in ev.check_results([bad], attacks))
    weak_aa = _result([1, 1, 1, 1], pgd40=[1, 0, 0, 0], aa=[1, 1, 0, 0])
    messages = ev.check_results([weak_aa], attacks)
    assert any("below AutoAttack" in m for m in messages)
    assert ev.check_results([weak_aa], attacks, transfer=True) == []  # transferred AA need not be stronger
    fine = _result([1, 1, 1, 1], pgd40=[1, 1, 0, 0], aa=[1, 0, 0, 0])
    assert ev.check_results([fine], attacks) == []
    # Another budget for PGD: no comparison.
    assert ev.check_results([weak_aa], [build_attack("pgd40", epsilon=4 / 255), attacks[1]]) == []


def test_sweep_check_flags_accuracy_that_does_not_fall():
    def swept(*accs):
        r = _result([1, 1, 1, 1])
        r.sweep["pgd40"] = {e: torch.arange(4) < k for e, k in zip((0.0, 0.01, 0.02, 0.03), accs)}
        return r

    assert ev.check_sweep([swept(4, 3, 2, 0)]) == []
    assert any("rises" in m for m in ev.check_sweep([swept(4, 2, 3, 1)]))
    assert any("does not fall" in m for m in ev.check_sweep([swept(4, 3, 3, 3)]))


def test_markdown_table_and_epsilon_format():
    r = _result([1, 1, 0, 0], pgd40=[1, 0, 0, 0])
    (rows,) = _tables(ev.markdown_table([r], ["pgd40"]))
    assert rows == [{"model": "m", "clean": "50.00", "pgd40": "25.00", "worst case": "25.00"}]
    assert ev.format_epsilon(8 / 255, "linf") == "8/255"
    assert ev.format_epsilon(0.2, "linf") == "0.2"  # 51/255 too, but the user wrote 0.2
    assert ev.format_epsilon(0.5, "l2") == "0.5"


def test_accuracy_is_exact_from_the_count():
    mask = torch.zeros(200, dtype=torch.bool)
    mask[:113] = True
    assert ev.accuracy(mask) == 56.5  # a float32 mean gives 56.49999976158142
    assert ev.accuracy(torch.zeros(0, dtype=torch.bool)) == 0.0


def test_a_run_folder_brings_its_arch(trained, tmp_path, capsys):
    """Without --arch, a model is built as its run's config.json says (smallcnn here, not resnet18)."""
    code, _, err = _run(capsys, ["--model-dir", trained, "--attacks", "pgd1", "--n-examples", "8",
                                 "--out", tmp_path / "a.json"])
    assert code == 0, err
    assert [m["arch"] for m in _json(tmp_path / "a.json")["models"]] == ["smallcnn"]


def test_the_caption_says_when_the_examples_come_from_a_test_limit_subset():
    script = _script()
    assert script.examples_phrase(script.parse_args(["--model-dir", "d"]), 200) == "first 200 test images"
    limited = script.parse_args(["--model-dir", "d", "--test-limit", "500"])
    assert script.examples_phrase(limited, 200) == "first 200 of a seeded subset of 500 test images (--test-limit)"
