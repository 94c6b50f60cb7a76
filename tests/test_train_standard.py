"""train_standard.py end to end: files, accuracy, resume, and every bad-input case."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_standard
from tests.conftest import HAVE_FASHION
from tests.helpers import assert_user_error, run_script, spy_on_pgd

SYNTH = ["--dataset", "synthetic", "--arch", "smallcnn", "--batch-size", "32", "--epsilon", "0.1",
         "--num-steps", "2", "--eval-steps", "2", "--lr", "0.05", "--no-progress"]
# Two training batches an epoch (64 images less the default hold-out of 6) and 32 test images.
ROOT = Path(__file__).resolve().parents[1]
TINY = [*SYNTH, "--train-limit", "64", "--test-limit", "32"]


@pytest.mark.skipif(not HAVE_FASHION, reason="needs Fashion-MNIST in /usr/share/datasets/fashion-mnist "
                                              "(Debian package dataset-fashion-mnist, which CI installs)")
def test_short_real_run_learns_and_writes_every_file(tmp_path, capsys):
    """Fashion-MNIST, found in the system folder when --data-dir has none: clean accuracy well above chance."""
    (tmp_path / "nodata").mkdir()
    argv = ["--dataset", "fashion-mnist", "--data-dir", tmp_path / "nodata", "--arch", "smallcnn",
            "--train-limit", "2000", "--test-limit", "500", "--epochs", "2",
            "--warm-up-epochs", "1", "--batch-size", "32", "--lr", "0.05", "--epsilon", "0.1", "--num-steps", "3",
            "--eval-steps", "5", "--lr-milestones", "1", "--model-dir", tmp_path / "run", "--no-progress"]
    code, out, err = run_script(capsys, "train_standard", argv)
    assert code == 0, err
    run = tmp_path / "run"
    for name in ("best_model.pth", "last.pth", "config.json", "metrics.jsonl", "curves.png"):
        assert (run / name).is_file(), name
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    for key in ("epoch", "lr", "train_loss", "train_acc", "clean_acc", "pgd_acc", "train_seconds", "seconds"):
        assert key in lines[0]
    assert lines[1]["lr"] == pytest.approx(0.005)  # divided by 10 at milestone 1
    assert lines[-1]["clean_acc"] > 50.0  # chance is 10 %
    assert lines[-1]["pgd_acc"] <= lines[-1]["clean_acc"]
    config = json.loads((run / "config.json").read_text())
    assert config["arch"] == "smallcnn" and config["epsilon"] == 0.1 and config["dataset"] == "fashion-mnist"
    state = torch.load(run / "best_model.pth", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    last = torch.load(run / "last.pth", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "rng", "args"} <= set(last)
    assert "epoch=2" in out


def test_underscore_spellings_and_fraction_epsilon():
    args = train_standard.parse_args(["--model_dir", "x", "--num_steps", "3", "--epsilon", "8/255"])
    assert args.model_dir == "x" and args.num_steps == 3
    assert args.epsilon == pytest.approx(8 / 255) and args.step_size == pytest.approx(2 / 255)


def test_paper_defaults():
    a = train_standard.parse_args([])
    assert (a.arch, a.dataset, a.distance, a.num_steps) == ("resnet18", "cifar10", "l_inf", 10)
    assert a.epsilon == pytest.approx(8 / 255) and a.step_size == pytest.approx(a.epsilon / 4)
    assert (a.lr, a.momentum, a.weight_decay, a.epochs, a.lr_milestones) == (0.1, 0.9, 2e-4, 100, [75, 90])
    assert train_standard.parse_args(["--distance", "l_2"]).epsilon == 0.5


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, capsys, monkeypatch):
    # Bit-identical weights: on the CPU, whose kernels are deterministic (cuDNN's need not be).
    common = [*SYNTH, "--epochs", "3", "--lr-milestones", "2", "--device", "cpu"]
    code, _, err = run_script(capsys, "train_standard", [*common, "--model-dir", tmp_path / "full"])
    assert code == 0, err

    # Crash in the middle of epoch 3: the loop dies after a few batches.
    import utils.training.loop as loop

    real = loop.train_epoch
    calls = {"n": 0}

    def crashing(model, loader, step, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            it = iter(loader)
            x, y = next(it)
            step(x, y)
            raise KeyboardInterrupt
        return real(model, loader, step, *a, **k)

    monkeypatch.setattr(loop, "train_epoch", crashing)
    code, _, err = run_script(capsys, "train_standard", [*common, "--model-dir", tmp_path / "part"])
    assert code == 130 and "--resume" in err
    monkeypatch.setattr(loop, "train_epoch", real)
    code, _, err = run_script(capsys, "train_standard", [*common, "--model-dir", tmp_path / "part", "--resume"])
    assert code == 0, err

    full = torch.load(tmp_path / "full" / "last.pth", weights_only=True)
    part = torch.load(tmp_path / "part" / "last.pth", weights_only=True)
    assert full["epoch"] == part["epoch"] == 3
    for key, value in full["model"].items():
        assert torch.equal(value, part["model"][key]), key
    full_lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    part_lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    wall = ("seconds", "train_seconds")
    strip = [{k: v for k, v in json.loads(ln).items() if k not in wall} for ln in full_lines]
    assert strip == [{k: v for k, v in json.loads(ln).items() if k not in wall} for ln in part_lines]


@pytest.mark.parametrize("argv,fragments", [
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/dir"], ["/nonexistent/dir"]),
    (["--arch", "resnet1000"], ["--arch", "resnet1000"]),
    (["--dataset", "imagenet-21k"], ["--dataset", "imagenet-21k"]),
    (["--epsilon", "0"], ["--epsilon"]),
    (["--epsilon", "-0.1"], ["--epsilon"]),
    (["--num-steps", "0"], ["--num-steps"]),
    (["--step-size", "0"], ["--step-size"]),
    (["--epsilon", "abc"], ["--epsilon"]),
    (["--epsilon", "8"], ["--epsilon", "8/255"]),  # the 0-255 scale by mistake
    (["--epsilon", "nan"], ["--epsilon", "finite"]),
    (["--lr", "nan"], ["--lr"]),
    (["--lr", "inf"], ["--lr"]),
    (["--momentum", "-1"], ["--momentum"]),
    (["--lr-gamma", "0"], ["--lr-gamma"]),
])
def test_bad_flags_give_one_line(tmp_path, capsys, argv, fragments):
    result = run_script(capsys, "train_standard", [*argv, "--model-dir", tmp_path / "m"])
    assert_user_error(result, *fragments)


def _resume(tmp_path, capsys, extra=()):
    return run_script(capsys, "train_standard", [*SYNTH, "--epochs", "1", "--model-dir", tmp_path, "--resume", *extra])


def test_resume_without_checkpoint(tmp_path, capsys):
    assert_user_error(_resume(tmp_path, capsys), "--resume", "last.pth")


def test_resume_from_truncated_checkpoint(tmp_path, capsys):
    code, _, err = run_script(capsys, "train_standard", [*SYNTH, "--epochs", "1", "--model-dir", tmp_path])
    assert code == 0, err
    data = (tmp_path / "last.pth").read_bytes()
    (tmp_path / "last.pth").write_bytes(data[: len(data) // 2])
    assert_user_error(_resume(tmp_path, capsys), "--resume", "last.pth")


def test_resume_from_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "last.pth").write_text("hello, I am not a checkpoint\n")
    assert_user_error(_resume(tmp_path, capsys), "--resume", "last.pth")


def test_resume_with_wrong_architecture(tmp_path, capsys):
    code, _, err = run_script(capsys, "train_standard", [*SYNTH, "--epochs", "1", "--model-dir", tmp_path])
    assert code == 0, err
    argv = [*SYNTH, "--epochs", "2", "--model-dir", tmp_path, "--resume", "--arch", "smallcnn-nobn"]
    assert_user_error(run_script(capsys, "train_standard", argv), "--resume", "model")


def test_resume_refuses_changed_flags_and_keeps_the_config(tmp_path, capsys):
    code, _, err = run_script(capsys, "train_standard", [*SYNTH, "--epochs", "1", "--model-dir", tmp_path])
    assert code == 0, err
    config = (tmp_path / "config.json").read_text()
    result = _resume(tmp_path, capsys, ["--lr", "0.5", "--epochs", "2"])
    assert_user_error(result, "--resume", "--lr")
    assert (tmp_path / "config.json").read_text() == config
    # Another script's run (its flags differ, e.g. NAMID's --alpha) is refused...
    ckpt = torch.load(tmp_path / "last.pth", weights_only=True)
    torch.save({**ckpt, "args": {**ckpt["args"], "alpha": 5.0}}, tmp_path / "last.pth")
    assert_user_error(_resume(tmp_path, capsys, ["--epochs", "2"]), "--resume", "another script")
    # ...but a run from before a speed or run flag existed (here --overwrite) is not.
    older = {k: v for k, v in ckpt["args"].items() if k != "overwrite"}
    torch.save({**ckpt, "args": older}, tmp_path / "last.pth")
    # --epochs (and the speed flags) may change: that is how a run is extended.
    code, _, err = _resume(tmp_path, capsys, ["--epochs", "2", "--channels-last"])
    assert code == 0, err
    assert [json.loads(ln)["epoch"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_curves_that_cannot_be_written_cost_no_epoch(tmp_path, capsys):
    (tmp_path / "curves.png").mkdir()  # a folder in the picture's place: the rename onto it fails
    code, _, err = run_script(capsys, "train_standard", [*TINY, "--epochs", "2", "--model-dir", tmp_path])
    assert code == 0, err
    assert err.count("could not write") == 2 and "curves.png" in err
    assert torch.load(tmp_path / "last.pth", weights_only=True)["epoch"] == 2
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_ctrl_c_advises_resume_only_when_an_epoch_was_kept(tmp_path, capsys, monkeypatch):
    import utils.training.loop as loop

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_epoch", interrupted)
    code, _, err = run_script(capsys, "train_standard", [*TINY, "--epochs", "2", "--model-dir", tmp_path])
    assert code == 130 and "--resume" not in err and "run the same command again" in err
    # As advised: the same command runs, since no epoch of the first attempt was kept.
    monkeypatch.undo()
    code, _, err = run_script(capsys, "train_standard", [*TINY, "--epochs", "2", "--model-dir", tmp_path])
    assert code == 0, err


def test_ctrl_c_while_the_first_epoch_is_saved_advises_overwrite(tmp_path, capsys, monkeypatch):
    import utils.training.run as run_module

    real = run_module.atomic_save

    def interrupted_at_last_pth(obj, path):
        if str(path).endswith("last.pth"):
            raise KeyboardInterrupt
        real(obj, path)

    monkeypatch.setattr(run_module, "atomic_save", interrupted_at_last_pth)
    argv = [*TINY, "--epochs", "1", "--model-dir", tmp_path]
    code, _, err = run_script(capsys, "train_standard", argv)
    assert code == 130 and "--overwrite" in err and "--resume" not in err
    monkeypatch.undo()
    code, _, err = run_script(capsys, "train_standard", [*argv, "--overwrite"])  # as advised
    assert code == 0, err


def test_overwrite_drops_the_old_last_pth_at_once(tmp_path, capsys, monkeypatch):
    """A Ctrl-C in the first epoch of an --overwrite run must not leave the replaced run's
    last.pth to be resumed as if it were this run's."""
    import utils.training.loop as loop

    code, _, err = run_script(capsys, "train_standard", [*TINY, "--epochs", "2", "--model-dir", tmp_path])
    assert code == 0, err

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_epoch", interrupted)
    argv = [*TINY, "--epochs", "2", "--overwrite", "--model-dir", tmp_path]
    code, _, err = run_script(capsys, "train_standard", argv)
    assert code == 130 and "--resume" not in err
    assert not (tmp_path / "last.pth").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_a_run_without_last_pth_is_not_overwritten(tmp_path, capsys):
    argv = [*TINY, "--epochs", "1", "--model-dir", tmp_path]
    code, _, err = run_script(capsys, "train_standard", argv)
    assert code == 0, err
    (tmp_path / "last.pth").unlink()  # as in a committed run, whose checkpoints are left out
    before = (tmp_path / "metrics.jsonl").read_text()
    assert_user_error(run_script(capsys, "train_standard", argv), "metrics.jsonl", "last.pth", "--overwrite")
    assert (tmp_path / "metrics.jsonl").read_text() == before
    code, _, err = run_script(capsys, "train_standard", [*argv, "--overwrite"])
    assert code == 0, err


def test_a_closed_output_pipe_ends_quietly():
    """``script | head``: the reader goes away; no traceback, exit status 141 (128 + SIGPIPE)."""
    code = "from utils.script import run_main\nrun_main(lambda: [print('x' * 99) for _ in range(10 ** 6)])"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == b""


def test_fresh_start_refuses_a_folder_holding_a_run(tmp_path, capsys):
    argv = [*TINY, "--model-dir", tmp_path]
    code, _, err = run_script(capsys, "train_standard", [*argv, "--epochs", "2"])
    assert code == 0, err
    before = (tmp_path / "metrics.jsonl").read_text()
    assert_user_error(run_script(capsys, "train_standard", [*argv, "--epochs", "1"]), "--resume", "--overwrite")
    assert (tmp_path / "metrics.jsonl").read_text() == before
    code, _, err = run_script(capsys, "train_standard", [*argv, "--epochs", "1", "--lr", "0.01", "--overwrite"])
    assert code == 0, err
    # Only the new run's epoch is left: none of the replaced run's lines.
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["lr"]) for r in lines] == [(1, 0.01)]
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.01


def test_unwritable_model_dir_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("")
    import utils.training.setup

    def no_loading(*a, **k):
        raise AssertionError("data loaded before --model-dir was checked")

    monkeypatch.setattr(utils.training.setup, "load_splits", no_loading)
    argv = [*SYNTH, "--epochs", "1", "--model-dir", tmp_path / "a_file"]
    assert_user_error(run_script(capsys, "train_standard", argv), "--model-dir", "a_file")


def test_checkpoints_get_the_usual_file_permissions(tmp_path, capsys):
    code, _, err = run_script(capsys, "train_standard", [*SYNTH, "--epochs", "1", "--model-dir", tmp_path])
    assert code == 0, err
    expected = (tmp_path / "metrics.jsonl").stat().st_mode & 0o777  # an ordinary appended file
    for name in ("last.pth", "best_model.pth", "config.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


def test_divergence_stops_with_one_line(tmp_path, capsys):
    argv = [*SYNTH, "--epochs", "2", "--train-limit", "128", "--lr", "1e30", "--model-dir", tmp_path]
    assert_user_error(run_script(capsys, "train_standard", argv), "diverged", "--lr")
    assert not (tmp_path / "last.pth").exists()  # the NaN epoch is never committed


def test_resume_of_a_finished_run_says_so(tmp_path, capsys):
    code, _, err = run_script(capsys, "train_standard", [*SYNTH, "--epochs", "1", "--model-dir", tmp_path])
    assert code == 0, err
    code, out, err = _resume(tmp_path, capsys)
    assert code == 0, err
    assert "nothing to train" in out


def test_resume_drops_a_torn_metrics_line(tmp_path, capsys):
    code, _, err = run_script(capsys, "train_standard", [*SYNTH, "--epochs", "1", "--model-dir", tmp_path])
    assert code == 0, err
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "lr": 0.0')  # a crash in the middle of the next epoch's line
    code, _, err = _resume(tmp_path, capsys, ["--epochs", "2"])
    assert code == 0, err
    assert [json.loads(ln)["epoch"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_drops_a_whole_metrics_line_of_an_uncommitted_epoch(tmp_path, capsys):
    """A crash between the metrics line and last.pth leaves a complete line for an epoch that last.pth
    does not hold: the resumed run redoes that epoch, and its line must not appear twice."""
    code, _, err = run_script(capsys, "train_standard", [*TINY, "--epochs", "1", "--model-dir", tmp_path])
    assert code == 0, err
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "lr": 0.05, "clean_acc": -1.0, "pgd_acc": -1.0, "stale": True}) + "\n")
    code, _, err = run_script(capsys, "train_standard", [*TINY, "--epochs", "2", "--model-dir", tmp_path, "--resume"])
    assert code == 0, err
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert not any("stale" in r for r in lines) and lines[1]["clean_acc"] >= 0


class Boom:
    def __reduce__(self):
        import os
        return (os.system, ("touch PWNED",))


def test_crafted_pickle_is_never_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"epoch": 1, "model": Boom()}, tmp_path / "last.pth")
    assert_user_error(_resume(tmp_path, capsys), "--resume")
    assert not (tmp_path / "PWNED").exists()


def test_subprocess_error_has_no_traceback(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "train_standard.py"), "--dataset", "npy", "--data-dir",
                           str(tmp_path), "--model-dir", str(tmp_path / "m")], capture_output=True, text=True,
                          cwd=root, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_warm_up_covering_every_epoch_is_flagged(capsys):
    import train_standard

    train_standard.parse_args(["--epochs", "2", "--warm-up-epochs", "2"])
    assert "no adversarial training" in capsys.readouterr().err
    train_standard.parse_args(["--epochs", "3", "--warm-up-epochs", "2"])
    assert capsys.readouterr().err == ""


# --- the loss choice, model selection, resume of the best model, the ε ramp ---

@pytest.mark.parametrize("kind", ["ce", "trades", "mart"])
def test_loss_flag_picks_the_objective(kind):
    from types import SimpleNamespace

    from models import get_model
    from utils.training import losses

    torch.manual_seed(1)
    model = get_model("smallcnn", 10, 3)
    # SmallCNN's last layer starts at zero: give it varied predictions, so that the losses differ.
    torch.nn.init.normal_([m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].weight)
    model.eval()  # the same logits here and inside the objective
    x = torch.rand(16, 3, 32, 32)
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    y = torch.randint(0, 10, (16,))
    with torch.no_grad():
        nat, adv = model(x), model(x_adv)
    expected = {"ce": lambda: torch.nn.functional.cross_entropy(adv, y),
                "trades": lambda: losses.trades_loss(nat, adv, y, 3.0),
                "mart": lambda: losses.mart_loss(nat, adv, y, 3.0)}
    values = {k: f() for k, f in expected.items()}
    assert len({round(float(v), 4) for v in values.values()}) == 3  # the comparison tells the losses apart
    loss, logits, _ = train_standard.standard_objective(model, x, x_adv, y, SimpleNamespace(loss=kind, beta=3.0))
    torch.testing.assert_close(loss.detach(), values[kind])
    torch.testing.assert_close(logits.detach(), adv)


# How each defense crafts its training examples, as in the TRADES and MART reference code: TRADES ascends
# the KL divergence from a 0.001·N(0, I) start; Standard AT and MART ascend the cross-entropy from a
# uniform start in the ε-ball.
@pytest.mark.parametrize("kind,attack", [("ce", ("ce", "uniform")), ("trades", ("kl", "normal")),
                                         ("mart", ("ce", "uniform"))])
def test_loss_flag_picks_the_training_attack(kind, attack, tmp_path, capsys, monkeypatch):
    calls = spy_on_pgd(monkeypatch, train_standard)
    argv = [*TINY, "--epochs", "1", "--loss", kind, "--model-dir", tmp_path]
    code, _, err = run_script(capsys, "train_standard", argv)
    assert code == 0, err
    assert len(calls) == 2  # two training batches; the per-epoch evaluation attacks through another name
    for call in calls:
        assert (call["loss"], call["random_start"]) == attack
        assert call["epsilon"] == pytest.approx(0.1) and call["num_steps"] == 2


def _scripted_scores(monkeypatch, scores):
    """Replace the per-epoch evaluation by the given PGD accuracies, one per call, in order.

    Returns (scores left, number of images in each evaluation loader)."""
    import utils.training.loop as loop

    left = list(scores)
    sizes = []

    def evaluate(model, loader, *a, **k):
        sizes.append(sum(len(y) for _, y in loader))
        score = float(left.pop(0))
        return {"clean_acc": score, "pgd_acc": score}

    monkeypatch.setattr(loop, "evaluate", evaluate)
    return left, sizes


def _same_weights(a, b):
    sa, sb = (torch.load(p, weights_only=True) for p in (a, b))
    sa, sb = (s["model"] if "model" in s else s for s in (sa, sb))
    return sa.keys() == sb.keys() and all(torch.equal(v, sb[k]) for k, v in sa.items())


def _records(folder):
    return [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("val_size,split,size", [("16", "val", 16), ("0", "test", 32)])
def test_best_model_is_the_best_scoring_epoch_on_the_selection_split(val_size, split, size, tmp_path, capsys,
                                                                     monkeypatch):
    left, sizes = _scripted_scores(monkeypatch, [50, 70, 60])
    argv = [*TINY, "--epochs", "3", "--val-size", val_size, "--save-freq", "1", "--model-dir", tmp_path]
    code, _, err = run_script(capsys, "train_standard", argv)
    assert code == 0, err
    assert left == [] and sizes == [size] * 3  # each epoch scored on the held-out split (or the test split)
    records = _records(tmp_path)
    assert [r["best"] for r in records] == [True, True, False]
    assert {(r["selected_on"], r["evaluated_on"]) for r in records} == {(split, split)}
    assert _same_weights(tmp_path / "best_model.pth", tmp_path / "model_epoch2.pth")
    assert not _same_weights(tmp_path / "best_model.pth", tmp_path / "model_epoch3.pth")
    assert torch.load(tmp_path / "last.pth", weights_only=True)["best_score"] == 70


def test_resume_keeps_the_best_model_of_the_epochs_before_the_crash(tmp_path, capsys, monkeypatch):
    """Epoch 1 scores best; the run is interrupted after it and resumed: the worse epochs 2 and 3 must not
    replace best_model.pth, as they do not in an uninterrupted run."""
    import utils.training.loop as loop

    # The two runs' epoch-1 weights are compared to the bit: on the CPU, whose kernels are deterministic.
    common = [*TINY, "--epochs", "3", "--save-freq", "1", "--device", "cpu"]
    left, _ = _scripted_scores(monkeypatch, [60, 40, 50])
    code, _, err = run_script(capsys, "train_standard", [*common, "--model-dir", tmp_path / "full"])
    assert code == 0, err
    assert left == []

    real = loop.train_epoch
    calls = {"n": 0}

    def interrupted_in_epoch_2(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, "train_epoch", interrupted_in_epoch_2)
    _scripted_scores(monkeypatch, [60])
    code, _, err = run_script(capsys, "train_standard", [*common, "--model-dir", tmp_path / "part"])
    assert code == 130, err
    assert torch.load(tmp_path / "part" / "last.pth", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(loop, "train_epoch", real)
    left, _ = _scripted_scores(monkeypatch, [40, 50])
    code, _, err = run_script(capsys, "train_standard", [*common, "--model-dir", tmp_path / "part", "--resume"])
    assert code == 0, err
    assert left == []

    full, part = tmp_path / "full", tmp_path / "part"
    # Not a degenerate case: the best model is epoch 1's, and the last epoch's weights differ from it.
    assert _same_weights(full / "best_model.pth", full / "model_epoch1.pth")
    assert not _same_weights(full / "best_model.pth", full / "last.pth")
    assert _same_weights(part / "best_model.pth", full / "best_model.pth")
    best_scores = [torch.load(f / "last.pth", weights_only=True)["best_score"] for f in (full, part)]
    assert best_scores[0] == best_scores[1] == 60
    assert [r["best"] for r in _records(part)] == [r["best"] for r in _records(full)] == [True, False, False]


def test_epsilon_ramp_grows_over_the_adversarial_epochs(tmp_path, capsys, monkeypatch):
    """--epsilon-ramp-epochs R: the k-th adversarial epoch trains at ε·k/R until k = R (clean warm-up epochs
    do not count); the attack of each batch uses that budget."""
    calls = spy_on_pgd(monkeypatch, train_standard)
    argv = [*TINY, "--epochs", "3", "--warm-up-epochs", "1", "--epsilon-ramp-epochs", "2", "--model-dir", tmp_path]
    code, _, err = run_script(capsys, "train_standard", argv)
    assert code == 0, err
    eps = 0.1
    assert [r["train_epsilon"] for r in _records(tmp_path)] == pytest.approx([0.0, eps / 2, eps])
    # Two batches an epoch; the warm-up epoch crafts no attack.
    assert [c["epsilon"] for c in calls] == pytest.approx([eps / 2, eps / 2, eps, eps])
