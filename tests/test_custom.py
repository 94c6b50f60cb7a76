"""models/custom.py and its flags: a user's own architecture (``module.path:callable``) evaluated
from its own checkpoint format, and --normalize, which keeps every attack in [0, 1]."""
import argparse
import json
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn

import train_standard
from models import get_model
from models.custom import (
    NORMALIZE_PRESETS,
    Normalization,
    Normalized,
    build_model,
    check_arch,
    parse_normalization,
)
from tests.helpers import assert_user_error
from tests.test_test_comparison import _json, _run
from utils.attacks.pgd import pgd
from utils.data.loaders import load_splits
from utils.evaluation.results import first_examples

USER_MODULE = '''
    """A model of one's own: it normalises its inputs itself and knows nothing of return_features."""
    import torch
    import torch.nn as nn


    class Net(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5))
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten(), nn.Linear(8, num_classes))

        def forward(self, x):
            return self.body((x - self.mean) / 0.25)


    def build(num_classes):
        return Net(num_classes)


    def broken(num_classes):
        raise RuntimeError(f"no weights for {num_classes} classes")


    NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """usermodels.py in the working directory, and a checkpoint in its own format: the weights under
    ``model_state_dict`` with DataParallel's prefix, beside numpy numbers and the run's Namespace."""
    (tmp_path / "usermodels.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # for this test's own import below
    import importlib

    user = importlib.import_module("usermodels")
    torch.manual_seed(0)
    model = user.build(10)
    nn.init.normal_(model.body[-1].weight, std=0.5)
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "epoch": np.int64(30), "best_acc": np.float64(0.61), "args": argparse.Namespace(arch="mine", lr=0.1)},
               tmp_path / "mine.pt")
    yield model.eval(), tmp_path / "mine.pt"
    monkeypatch.delitem(__import__("sys").modules, "usermodels", raising=False)


def test_a_user_module_is_evaluated_from_its_own_checkpoint(user_module, tmp_path, capsys):
    model, checkpoint = user_module
    code, out, err = _run(capsys, ["--checkpoint", checkpoint, "--arch", "usermodels:build", "--name", "mine",
                                   "--attacks", "pgd3", "--n-examples", "32", "--out", tmp_path / "r.json"])
    assert code == 0, err
    (entry,) = _json(tmp_path / "r.json")["models"]
    assert entry["arch"] == "usermodels:build" and entry["name"] == "mine"
    split = first_examples(load_splits("synthetic", "data", test_limit=64, seed=0)[0]["test"], 32)
    with torch.no_grad():
        correct = int((model(split.images.float() / 255).argmax(1) == split.labels).sum())
    assert entry["correct"]["clean"] == correct  # the weights of the file, not a fresh initialisation
    assert entry["correct"]["pgd3"] <= correct
    assert "| mine |" in out


@pytest.mark.parametrize("arch, fragments", [
    ("nomodule:build", ["--arch", "cannot import nomodule", "ModuleNotFoundError"]),
    ("usermodels:missing", ["--arch", "has no missing"]),
    ("usermodels:NOT_CALLABLE", ["--arch", "not a callable"]),
    ("usermodels:broken", ["--arch", "num_classes=10 failed", "RuntimeError: no weights for 10 classes"]),
    ("usermodels:", ["--arch", "not module.path:callable"]),
    ("resnet99", ["--arch", "unknown architecture"]),
])
def test_a_bad_architecture_is_one_line_naming_the_flag(user_module, capsys, arch, fragments):
    _, checkpoint = user_module
    assert_user_error(_run(capsys, ["--checkpoint", checkpoint, "--arch", arch, "--attacks", "pgd1"]), *fragments)


def test_a_surrogate_of_ones_own_architecture(user_module, tmp_path, capsys):
    _, checkpoint = user_module
    code, _, err = _run(capsys, ["--checkpoint", checkpoint, "--arch", "usermodels:build", "--surrogate", checkpoint,
                                 "--surrogate-arch", "usermodels:build", "--attacks", "pgd2", "--n-examples", "16",
                                 "--out", tmp_path / "t.json"])
    assert code == 0, err
    assert _json(tmp_path / "t.json")["settings"]["surrogate"]["arch"] == "usermodels:build"
    assert_user_error(_run(capsys, ["--checkpoint", checkpoint, "--arch", "usermodels:build", "--surrogate",
                                    checkpoint, "--surrogate-arch", "usermodels:broken"]), "--surrogate-arch", "failed")


# ---------------------------------------------------------------- --normalize


def test_normalization_specs_and_presets():
    assert parse_normalization("cifar10") == Normalization(*NORMALIZE_PRESETS["cifar10"])
    assert parse_normalization("0.5,0.25/0.5,2") == Normalization((0.5, 0.25), (0.5, 2.0))
    for bad in ("0.5/0.5/0.5", "0.5,0.5/0.5", "a/b", "0.5/0", "0.5/-1", "nan/1", "imagenet"):
        with pytest.raises(ValueError):
            parse_normalization(bad)
    assert check_arch("smallcnn") == "smallcnn" and check_arch("a.b:c") == "a.b:c"
    with pytest.raises(ValueError, match="module.path:callable"):
        check_arch(":c")
    with pytest.raises(ValueError, match="channel"):
        build_model("smallcnn", 10, 1, parse_normalization("cifar10"))


def test_normalized_model_normalises_inside_forward_and_keeps_the_networks_keys():
    torch.manual_seed(0)
    net = get_model("smallcnn", 10, 3).eval()
    mean, std = NORMALIZE_PRESETS["cifar10"]
    wrapped = Normalized(net, mean, std).eval()
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    net.double(), wrapped.double()
    z = (x - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(std, dtype=torch.float64).view(
        1, 3, 1, 1)
    assert torch.allclose(wrapped(x), net(z), rtol=0, atol=1e-12)
    logits, feats = wrapped(x, return_features=True)  # stages 2 and 3 read the features
    ref_logits, ref_feats = net(z, return_features=True)
    assert torch.allclose(logits, ref_logits, atol=1e-12) and set(feats) == set(ref_feats) == {"layer3", "layer4"}
    # The keys are the bare network's: checkpoints go both ways, and a container's prefix is kept.
    assert list(wrapped.state_dict()) == list(net.state_dict())
    fresh = get_model("smallcnn", 10, 3).double()
    fresh.load_state_dict(wrapped.state_dict())
    again = Normalized(get_model("smallcnn", 10, 3), mean, std).double().eval()
    again.load_state_dict(net.state_dict())
    assert torch.equal(again(x), wrapped(x))
    holder = nn.ModuleDict({"m": wrapped})
    assert list(holder.state_dict()) == [f"m.{k}" for k in net.state_dict()]
    holder.load_state_dict(holder.state_dict())


def test_attacks_on_a_normalized_model_stay_in_the_unit_box():
    torch.manual_seed(0)
    model = Normalized(get_model("smallcnn-nobn", 10, 3), (0.5, 0.5, 0.5), (0.1, 0.1, 0.1)).eval()
    nn.init.normal_(model.net.classifier[-1].weight, std=0.1)
    x = torch.rand(8, 3, 32, 32)
    y = torch.arange(8)
    x_adv = pgd(model, x, y, 8 / 255, 2 / 255, 5)
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert float((x_adv - x).abs().max()) <= 8 / 255 + 1e-6
    assert not torch.equal(x_adv, x)


def test_a_run_trained_with_normalize_is_evaluated_through_it(tmp_path, capsys):
    run = tmp_path / "run"
    train_standard.main(["--dataset", "synthetic", "--arch", "smallcnn", "--train-limit", "64", "--test-limit", "32",
                         "--epochs", "1", "--warm-up-epochs", "1", "--batch-size", "32", "--eval-steps", "1",
                         "--normalize", "cifar10", "--no-progress", "--model-dir", str(run)])
    config = json.loads((run / "config.json").read_text())
    assert config["normalize"] == "cifar10"
    saved = torch.load(run / "best_model.pth", weights_only=True)
    assert set(saved) == set(get_model("smallcnn", 10, 3).state_dict())  # the bare network's keys
    model = build_model("smallcnn", 10, 3, parse_normalization("cifar10"))
    model.load_state_dict(saved)
    model.eval()
    split = first_examples(load_splits("synthetic", "data", test_limit=64, seed=0)[0]["test"], 32)
    with torch.no_grad():
        logits = model(split.images.float() / 255)
        bare = get_model("smallcnn", 10, 3)
        bare.load_state_dict(saved)
        bare_logits = bare.eval()(split.images.float() / 255)
    assert not torch.allclose(logits, bare_logits)  # normalisation changes what the network sees
    code, _, err = _run(capsys, ["--model-dir", run, "--attacks", "pgd1", "--n-examples", "32",
                                 "--out", tmp_path / "r.json"])
    assert code == 0, err
    (entry,) = _json(tmp_path / "r.json")["models"]
    assert entry["normalize"] == "cifar10"
    assert entry["correct"]["clean"] == int((logits.argmax(1) == split.labels).sum())
    assert_user_error(_run(capsys, ["--model-dir", run, "--normalize", "1,2/3"]), "--normalize", "means")
