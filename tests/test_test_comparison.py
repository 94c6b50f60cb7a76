"""test_comparison.py: tables, JSON, worst case, transfer, model loading, ε sweeps and bad input.

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
from tests.helpers import assert_user_error, markdown_tables, run_script
from utils.attacks.registry import build_attack, robust_mask
from utils.data.loaders import load_splits
from utils.evaluation.engine import Evaluation
from utils.evaluation.results import Report, first_examples
from utils.training.device import seed_everything

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
    (rows, *_) = markdown_tables(out)
    assert list(rows[0]) == ["model", "clean", *attacks, "worst case"]
    row = rows[0]
    assert row["model"] == trained.name
    assert float(row["clean"]) == pytest.approx(model["clean"], abs=0.0051)
    assert float(row["worst case"]) == pytest.approx(model["worst_case"], abs=0.0051)
    for name in attacks:
        assert float(row[name]) == pytest.approx(model["attacks"][name], abs=0.0051)


def test_worst_case_is_the_and_of_the_per_attack_masks(trained, test_split):
    model = _model(trained)
    split = first_examples(test_split, 24)
    attacks = [build_attack("pgd3"), build_attack("mifgsm", steps=3), build_attack("ddn", steps=5)]
    engine = Evaluation({"m": model}, split, batch_size=24, device="cpu", seed=0, progress=False,
                           report=Report(echo=False))
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

    def patched(name, num_classes=10, in_channels=3, normalize=None):
        model = get_model(name, num_classes, in_channels)
        model.register_forward_pre_hook(forbid_gradients if name == "smallcnn" else count_gradients)
        return model

    monkeypatch.setattr(script, "build_model", patched)
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
    assert [r["model"] for r in markdown_tables(out)[0]] == ["first", "second"]
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
    assert torch.equal(first_examples(test_split, n).labels, labels[:n])

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
    (_, (printed,)) = markdown_tables(out)  # the table, then the sweep's one row: the JSON's numbers
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


# ---------------------------------------------------------------- torchrun


def test_two_processes_give_the_one_process_evaluation(trained, tmp_path):
    """Under torchrun (2 gloo processes) each process takes a block of whole batches (2 of 16 and 1 of
    8 here, an uneven split), and the first one writes the table: every example counted once, the same
    numbers as one process, attack noise included (each batch is seeded by its index)."""
    import os
    import subprocess

    common = [*DATA, "--model-dir", str(trained), "--arch", "smallcnn", "--attacks", "pgd3,mifgsm",
              "--n-examples", "40", "--batch-size", "16", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(prefix, name):
        done = subprocess.run([*prefix, "test_comparison.py", *common, "--out", str(tmp_path / f"{name}.json"),
                               "--md", str(tmp_path / f"{name}.md")],
                              cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        return done

    run([sys.executable], "one")
    two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], "two")
    assert two.stdout.count("| model |") == 1  # one table, from the first process only
    a, b = _json(tmp_path / "one.json"), _json(tmp_path / "two.json")
    assert (a["settings"]["processes"], b["settings"]["processes"]) == (1, 2)
    for m, n in zip(a["models"], b["models"], strict=True):
        assert n["n"] == m["n"] == 40
        assert n["correct"] == m["correct"] and n["attacks"] == m["attacks"] and n["clean"] == m["clean"]
    assert m["correct"]["pgd3"] < m["correct"]["clean"]  # the attack did something to compare
    assert (tmp_path / "one.md").read_text() == (tmp_path / "two.md").read_text()
    assert a["warnings"] == b["warnings"]


# ---------------------------------------------------------------- --aa-state


@pytest.fixture
def brief_autoattack(monkeypatch):
    """Every sub-attack of AutoAttack's standard version, briefly (2 iterations, 20 Square queries)."""
    import utils.attacks.autoattack as aa

    real_build = aa.build_autoattack

    def brief(*args, **kwargs):
        adversary = real_build(*args, **kwargs)
        aa.set_iterations(adversary, 2)
        adversary.square.n_queries = 20
        return adversary

    monkeypatch.setattr(aa, "build_autoattack", brief)


def test_autoattack_killed_and_resumed_equals_an_uninterrupted_run(trained, tmp_path, capsys, monkeypatch,
                                                                    brief_autoattack):
    """A kill right after the second sub-attack of the second batch was written; the same command
    then reads the first batch back whole, runs only FAB-T and Square on the second, and writes the
    numbers of a run without --aa-state."""
    import utils.training.checkpoint as checkpoint
    from tests.test_autoattack import _spy_calls

    argv = ["--model-dir", trained, "--arch", "smallcnn", "--attacks", "pgd2,aa", "--n-examples", "32",
            "--batch-size", "16", "--epsilon", "16/255"]
    code, _, err = _run(capsys, [*argv, "--out", tmp_path / "full.json"])
    assert code == 0, err

    real_save = checkpoint.atomic_save

    def save_then_die(state, path):
        real_save(state, path)
        if path.name == "batch00001.pt" and state["run_attacks"] == ["apgd-ce", "apgd-t"]:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "atomic_save", save_then_die)
    state = ["--aa-state", tmp_path / "aa", "--out", tmp_path / "resumed.json"]
    code, _, err = _run(capsys, [*argv, *state])
    assert code == 130 and "run the same command again to resume" in err and "Traceback" not in err
    assert not (tmp_path / "resumed.json").exists()
    monkeypatch.setattr(checkpoint, "atomic_save", real_save)
    calls = _spy_calls(monkeypatch)
    code, _, err = _run(capsys, [*argv, *state])
    assert code == 0, err
    assert [c[0] for c in calls] == [("fab-t",), ("square",)][:len(calls)]  # nothing attacked twice
    full, resumed = _json(tmp_path / "full.json")["models"][0], _json(tmp_path / "resumed.json")["models"][0]
    assert resumed["correct"] == full["correct"] and resumed["attacks"] == full["attacks"]
    assert full["correct"]["aa"] < full["correct"]["clean"]  # AutoAttack broke something to restore

    # The state of other batches (another --batch-size) is refused in one line.
    other = [*argv[:-4], "--batch-size", "8", "--epsilon", "16/255", *state]
    assert_user_error(_run(capsys, other), "--aa-state", "other examples or settings")


# ---------------------------------------------------------------- --robustbench-json


def test_robustbench_claims_hold_the_tables_numbers_field_by_field(trained, tmp_path, capsys, brief_autoattack):
    code, _, err = _run(capsys, ["--model-dir", trained, "--name", "std", "--checkpoint", trained / "best_model.pth",
                                 "--name", "again", "--arch", "smallcnn", "--attacks", "pgd2,aa", "--n-examples", "24",
                                 "--out", tmp_path / "r.json", "--robustbench-json", tmp_path / "rb.json"])
    assert code == 0, err
    models = {m["name"]: m for m in _json(tmp_path / "r.json")["models"]}
    claims = _json(tmp_path / "rb.json")
    assert [c["name"] for c in claims] == ["std", "again"]
    for claim in claims:
        model = models[claim["name"]]
        assert set(claim) == {"name", "dataset", "threat_model", "eps", "clean_acc", "autoattack_acc", "architecture",
                              "additional_data", "number_forward_passes", "n_examples", "autoattack_version"}
        assert claim["clean_acc"] == f"{model['clean']:.2f}" and float(claim["clean_acc"]) > 10
        assert claim["autoattack_acc"] == f"{model['attacks']['aa']:.2f}"
        assert float(claim["autoattack_acc"]) <= float(claim["clean_acc"])
        assert claim["eps"] == "8/255" and claim["threat_model"] == "Linf" and claim["dataset"] == "synthetic"
        assert claim["architecture"] == model["arch"] == "smallcnn"
        assert claim["additional_data"] is False and claim["number_forward_passes"] == 1
        assert claim["n_examples"] == model["n"] == 24 and claim["autoattack_version"] == "standard"
    assert_user_error(_run(capsys, ["--model-dir", trained, "--attacks", "pgd2", "--robustbench-json", tmp_path / "x"]),
                      "--robustbench-json", "aa")


def test_robustbench_claim_of_an_l2_evaluation():
    from tests.helpers import model_result
    from utils.evaluation.output import robustbench_claims

    result = model_result([1, 1, 1, 0], aa=[1, 0, 0, 0])
    (claim,) = robustbench_claims([result], build_attack("aa", norm="l2"), {"m": "mine:net"}, "cifar10", "standard")
    assert (claim["threat_model"], claim["eps"], claim["clean_acc"], claim["autoattack_acc"]) == ("L2", "0.5", "75.00",
                                                                                                  "25.00")
    assert claim["architecture"] == "mine:net" and claim["n_examples"] == 4
