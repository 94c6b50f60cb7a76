"""--compile in every stage and in the evaluation, on the CPU.

The runs use the aot_eager backend: Dynamo and AOTAutograd trace the same graphs as under
inductor (graph breaks, guards, the dynamic last batch, donated buffers, retained graphs), but
no code is generated, so a stage compiles in seconds here. Compiled and eager runs compute in
float64, where their only difference, the order of a few decomposed reductions, stays far
below the tolerance: every count (accuracies, sizes of W) must agree exactly and every loss
to a relative 1e-6, over two or more epochs of training with a partial last batch."""
import json
import math

import pytest
import torch

import train_MI_estimator
import train_MIAT
import train_standard
from models import get_model
from tests.test_test_comparison import _run as run_comparison
from utils.training.balance import grad_balance
from utils.training.setup import compiled

COMPILE = ["--compile", "--compile-backend", "aot_eager"]
# 280 images, 16 held out: eight batches of 32 and one of 8, so every epoch ends on a partial batch.
COMMON = ["--dataset", "synthetic", "--arch", "smallcnn", "--train-limit", "280", "--val-size", "16",
          "--test-limit", "32", "--batch-size", "32", "--epsilon", "0.1", "--num-steps", "2", "--eval-steps", "2",
          "--device", "cpu", "--seed", "1", "--no-progress"]
TIMES = ("seconds", "train_seconds")
REL = 1e-6


@pytest.fixture
def float64():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch._dynamo.reset()  # graphs traced by earlier tests count toward the recompile limit
    yield
    torch.set_default_dtype(dtype)
    torch._dynamo.reset()


def records(folder):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMES}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(eager, compiled_run):
    assert len(eager) == len(compiled_run) >= 2
    for e, c in zip(eager, compiled_run):
        assert set(e) == set(c)
        for k, v in e.items():
            if isinstance(v, float):
                assert math.isclose(c[k], v, rel_tol=REL, abs_tol=1e-12), (e["epoch"], k, v, c[k])
            else:
                assert c[k] == v, (e["epoch"], k, v, c[k])


def both(module, argv, root, name):
    """``module`` run eager and compiled into root/name and root/name_compiled: their records."""
    out = []
    for suffix, extra in (("", []), ("_compiled", COMPILE)):
        folder = root / f"{name}{suffix}"
        module.main([*map(str, argv), *extra, "--model-dir", str(folder)])
        out.append(records(folder))
    return out


def test_compiled_graph_survives_the_gradient_balance(float64):
    """The balance takes two retained gradients through the compiled graph before the step's
    backward. Once a partial batch has made the batch dimension dynamic, AOTAutograd's graph
    donates buffers and refuses retained graphs, unless the compile switches donation off."""
    net = get_model("smallcnn", num_classes=10, in_channels=3).train()
    model = compiled(net, "aot_eager")
    for size in (8, 8, 5, 8):
        x = torch.rand(size, 3, 32, 32)
        logits = model(x)
        l_adv = torch.nn.functional.cross_entropy(logits, torch.arange(size) % 10)
        l_mi = logits.logsumexp(dim=1).square().mean()
        loss, balance = grad_balance(net, l_adv, l_mi)
        net.zero_grad()
        loss.backward()
        assert float(balance["grad_adv"]) > 0 and float(balance["grad_mi"]) > 0
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_stages_1_2_3_compiled_compute_what_eager_computes(tmp_path, float64, capsys):
    # Two clean epochs teach the target enough for W (clean-correct, adversarially wrong) to fill.
    train = ["--epochs", "3", "--warm-up-epochs", "2", "--lr", "0.05", "--lr-milestones", "3"]
    assert_same_run(*both(train_standard, [*COMMON, *train], tmp_path, "stage1"))

    stage2 = [*COMMON, "--va-hsize", "16", "--epochs", "2", "--pre-target", tmp_path / "stage1" / "best_model.pth"]
    eager2, compiled2 = both(train_MI_estimator, stage2, tmp_path, "stage2")
    assert_same_run(eager2, compiled2)

    stage3 = [*COMMON, *train, "--va-hsize", "16", "--alpha", "0.5", "--mi-dir", tmp_path / "stage2"]
    eager3, compiled3 = both(train_MIAT, stage3, tmp_path, "stage3")
    assert_same_run(eager3, compiled3)
    # The adversarial epoch measured the balance through the compiled graph, with W non-empty.
    assert [r["train_epsilon"] > 0 for r in compiled3] == [False, False, True]
    assert compiled3[-1]["grad_adv"] > 0 and compiled3[-1]["grad_mi"] > 0
    capsys.readouterr()


def test_evaluation_compiled_gives_the_eager_table(tmp_path, float64, capsys):
    # Seed 0, the evaluation's: the synthetic images are drawn from the seed.
    train_standard.main([*COMMON, "--seed", "0", "--epochs", "3", "--warm-up-epochs", "3", "--lr", "0.05",
                         "--lr-milestones", "--model-dir", str(tmp_path / "run")])
    entries = []
    for extra in ([], COMPILE):
        out = tmp_path / f"eval{len(entries)}.json"
        # 64 test images in batches of 24: the last batch is partial here too.
        argv = ["--model-dir", tmp_path / "run", "--attacks", "pgd5,mifgsm", "--epsilon", "2/255",
                "--batch-size", "24", "--device", "cpu", "--out", out, *extra]
        code, _, err = run_comparison(capsys, argv)
        assert code == 0, err
        (entry,) = json.loads(out.read_text())["models"]
        entries.append(entry)
    eager, compiled_ = entries
    assert 0 < eager["correct"]["worst_case"] < eager["correct"]["clean"]  # the attacks did something
    assert compiled_["correct"] == eager["correct"]
    for name, acc in eager["attacks"].items():
        assert math.isclose(compiled_["attacks"][name], acc, rel_tol=REL), name
