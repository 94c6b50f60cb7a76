"""Stage 2 end to end: train_MI_estimator.py (Eq. 5) and train_MI_estimator_only_max.py (Eq. 4, --standard-mi)."""
import json
import math

import pytest
import torch

import train_MI_estimator
import train_MI_estimator_only_max
import train_standard
import utils.training.stage2 as stage2
from models import get_model
from tests.helpers import assert_user_error, run_script
from utils.mi.objectives import estimator_loss_max, estimator_loss_paper, estimator_loss_release
from utils.mi.patterns import Selection, attack_succeeded, select_samples

TINY = ["--dataset", "synthetic", "--arch", "smallcnn", "--train-limit", "32", "--test-limit", "32",
        "--batch-size", "16", "--va-hsize", "32", "--num-steps", "2", "--epsilon", "0.1", "--no-progress"]
ONE_BATCH = ["--train-limit", "16", "--test-limit", "16"]  # later flags win: one train and one eval batch
PAIR_FILES = ("local_n_model.pth", "global_n_model.pth", "local_a_model.pth", "global_a_model.pth")
STD_FILES = ("local_std_model.pth", "global_std_model.pth")
TABLE_KEYS = [f"{kind}_mi_{v}_{s}" for kind in ("natural", "adversarial") for v in ("x", "xadv")
              for s in ("right", "wrong")] + ["n_right", "n_wrong"]


@pytest.fixture(scope="module")
def pre_target(tmp_path_factory):
    """A briefly trained SmallCNN (plain state_dict), so that R and W are both non-empty at ε 0.1."""
    run = tmp_path_factory.mktemp("stage1")
    train_standard.main(["--dataset", "synthetic", "--arch", "smallcnn", "--train-limit", "256", "--test-limit", "16",
                         "--epochs", "3", "--warm-up-epochs", "3", "--batch-size", "32", "--lr", "0.05",
                         "--eval-steps", "1", "--model-dir", str(run), "--no-progress"])
    path = run / "target.pth"
    torch.save(torch.load(run / "last.pth", weights_only=True)["model"], path)
    return path


def strict_json_lines(path):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return [json.loads(ln, parse_constant=refuse) for ln in path.read_text().splitlines()]


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def spy_on_fit(monkeypatch, module):
    """Record the estimators' and the target's weights before training, and the objects themselves."""
    seen = {}
    real = module.fit_estimators

    def fit(run, first_epoch, setup, estimators, *rest, **kw):
        seen.update(before=snapshot(estimators), target_before=snapshot(setup.target), setup=setup,
                    estimators=estimators)
        return real(run, first_epoch, setup, estimators, *rest, **kw)

    monkeypatch.setattr(module, "fit_estimators", fit)
    return seen


@pytest.mark.parametrize("script,extra,files", [
    ("train_MI_estimator", [], PAIR_FILES),
    ("train_MI_estimator", ["--objective", "paper"], PAIR_FILES),
    ("train_MI_estimator_only_max", [], PAIR_FILES),
    ("train_MI_estimator_only_max", ["--standard-mi"], STD_FILES),
], ids=["eq5-release", "eq5-paper", "eq4-max", "standard-mi"])
def test_one_epoch_trains_estimators_only_and_writes_every_file(pre_target, tmp_path, capsys, monkeypatch,
                                                                 script, extra, files):
    module = {"train_MI_estimator": train_MI_estimator, "train_MI_estimator_only_max": train_MI_estimator_only_max}
    seen = spy_on_fit(monkeypatch, module[script])
    out_dir = tmp_path / "mi"
    code, out, err = run_script(capsys, script, [*TINY, "--pre-target", pre_target, "--epochs", "1",
                                                 "--model-dir", out_dir, *extra])
    assert code == 0, err
    assert "epoch=1" in out

    # The target is untouched, BN running statistics included (it stayed in eval mode).
    target_after = seen["setup"].target.state_dict()
    for key, value in seen["target_before"].items():
        assert torch.equal(value, target_after[key]), key
    assert not seen["setup"].target.training
    assert not any(p.requires_grad for p in seen["setup"].target.parameters())

    # Every saved estimator file is a plain state_dict whose weights moved.
    for name in files:
        state = torch.load(out_dir / name, weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in state.values())
        prefix = {"local_n": "natural.local.", "global_n": "natural.global_.", "local_a": "adversarial.local.",
                  "global_a": "adversarial.global_.", "local_std": "standard.local.",
                  "global_std": "standard.global_."}[name.rsplit("_model", 1)[0]]
        weights = [k for k in state if k.endswith("weight")]
        assert any(not torch.equal(state[k], seen["before"][prefix + k]) for k in weights), name
        assert all(torch.isfinite(v.float()).all() for v in state.values()), name
        # ... and it holds exactly the trained part it is named after (E_n vs E_a, local vs global).
        kind, part = prefix.rstrip(".").split(".")
        trained = getattr(seen["estimators"][kind], part).state_dict()
        assert state.keys() == trained.keys(), name
        assert all(torch.equal(state[k], trained[k]) for k in state), name
        if kind != "standard":  # the other estimator's same part differs, so a swap would show
            other_kind = "adversarial" if kind == "natural" else "natural"
            other = getattr(seen["estimators"][other_kind], part).state_dict()
            assert any(not torch.equal(state[k], other[k]) for k in weights), name
    other = PAIR_FILES if files == STD_FILES else STD_FILES
    assert not any((out_dir / name).exists() for name in other)

    last = torch.load(out_dir / "last.pth", weights_only=True)
    assert {"estimators", "optimizer", "scheduler", "epoch", "rng"} <= set(last) and last["epoch"] == 1
    assert json.loads((out_dir / "config.json").read_text())["pre_target"] == str(pre_target)
    (record,) = strict_json_lines(out_dir / "metrics.jsonl")
    keys = ["standard_mi_x", "standard_mi_xadv"] if files == STD_FILES else TABLE_KEYS
    for key in [*keys, "epoch", "lr", "train_loss", "clean_acc", "pgd_acc"]:
        assert key in record, key
    assert math.isfinite(record["train_loss"])
    assert (record["selected_on"], record["evaluated_on"]) == ("last epoch", "test")  # --val-size 0 here
    if files == PAIR_FILES:
        assert record["n_right"] > 0 and record["n_wrong"] > 0  # the fixture's target gives both sets
        assert record["n_right"] + record["n_wrong"] == round(record["clean_acc"] * 32 / 100)
    for picture in ("mi_table.png", "curves.png"):
        assert (out_dir / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture


def test_resume_equals_an_uninterrupted_run(pre_target, tmp_path, capsys):
    # Bit for bit: on the CPU, where the kernels are deterministic (a GPU's need not be).
    common = [*TINY, "--test-limit", "16", "--pre-target", pre_target, "--lr-milestones", "1", "--device", "cpu"]
    code, _, err = run_script(capsys, "train_MI_estimator", [*common, "--epochs", "2", "--model-dir", tmp_path / "a"])
    assert code == 0, err
    code, _, err = run_script(capsys, "train_MI_estimator", [*common, "--epochs", "1", "--model-dir", tmp_path / "b"])
    assert code == 0, err
    code, _, err = run_script(capsys, "train_MI_estimator",
                              [*common, "--epochs", "2", "--model-dir", tmp_path / "b", "--resume"])
    assert code == 0, err
    for name in PAIR_FILES:
        full, resumed = (torch.load(tmp_path / d / name, weights_only=True) for d in ("a", "b"))
        for key, value in full.items():
            assert torch.equal(value, resumed[key]), (name, key)
    drop = ("seconds", "train_seconds")  # wall times
    lines = [[{k: v for k, v in r.items() if k not in drop} for r in strict_json_lines(tmp_path / d / "metrics.jsonl")]
             for d in ("a", "b")]
    assert lines[0] == lines[1]
    assert [r["lr"] for r in lines[0]] == [pytest.approx(1e-2), pytest.approx(1e-3)]


def _masks(kind, y):
    none = torch.zeros_like(y, dtype=torch.bool)
    if kind == "nothing-correct":
        return Selection(none, none, none)
    if kind == "all-right":
        return Selection(~none, ~none, none)
    return Selection(~none, none, ~none)  # all wrong


@pytest.mark.parametrize("objective", ["release", "paper"])
def test_empty_sets_train_on_without_nan(pre_target, tmp_path, capsys, monkeypatch, objective):
    """Training batches cycle through: C empty, W empty (all right), R empty (all wrong); evaluation has C empty."""
    kinds = iter(["nothing-correct", "all-right", "all-wrong"])
    monkeypatch.setattr(train_MI_estimator, "select_samples", lambda ln, la, y, **_: _masks(next(kinds), y))
    monkeypatch.setattr(stage2, "select_samples", lambda ln, la, y, **_: _masks("nothing-correct", y))
    seen = spy_on_fit(monkeypatch, train_MI_estimator)
    code, _, err = run_script(capsys, "train_MI_estimator", [*TINY, "--pre-target", pre_target, "--epochs", "1",
                                                             "--train-limit", "48", "--objective", objective,
                                                             "--model-dir", tmp_path])
    assert code == 0, err
    assert next(kinds, None) is None  # all three kinds were trained on
    (record,) = strict_json_lines(tmp_path / "metrics.jsonl")
    assert math.isfinite(record["train_loss"])
    assert all(torch.isfinite(p).all() for p in seen["estimators"].parameters())
    assert record["n_right"] == record["n_wrong"] == 0
    assert all(record[k] is None for k in TABLE_KEYS[:-2])  # NaN means of empty sets written as null


def test_max_with_nothing_correct_or_fooled(pre_target, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_MI_estimator_only_max, "select_samples",
                        lambda ln, la, y, **_: _masks("nothing-correct", y))
    monkeypatch.setattr(train_MI_estimator_only_max, "attack_succeeded", lambda logits, y, **_: torch.zeros_like(y) > 0)
    code, _, err = run_script(capsys, "train_MI_estimator_only_max",
                              [*TINY, *ONE_BATCH, "--pre-target", pre_target, "--epochs", "1", "--model-dir", tmp_path])
    assert code == 0, err
    (record,) = strict_json_lines(tmp_path / "metrics.jsonl")
    assert record["train_loss"] == 0.0


def test_release_objective_flags_reach_the_loss(pre_target, tmp_path, capsys, monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return estimator_loss_release(*args, **kwargs)

    monkeypatch.setattr(train_MI_estimator, "estimator_loss_release", spy)
    argv = [*TINY, *ONE_BATCH, "--pre-target", pre_target, "--epochs", "1", "--model-dir", tmp_path,
            "--cos-weight", "2", "--r-weight", "0.25", "--a-r-cos-weight", "3", "--a_r_sum_weight", "0.7"]
    code, _, err = run_script(capsys, "train_MI_estimator", argv)
    assert code == 0, err
    assert len(calls) == 1  # one per training batch; evaluation needs no loss
    assert calls[0] == {"cos_weight": 2.0, "r_weight": 0.25, "a_r_cos_weight": 3.0, "a_r_sum_weight": 0.7}


SCRIPTS = {"train_MI_estimator": train_MI_estimator, "train_MI_estimator_only_max": train_MI_estimator_only_max}


def capture_step(monkeypatch, script, argv):
    """Run ``script``'s main up to ``fit_estimators`` and return what it hands to it: the training step among them."""
    seen = {}
    parse = SCRIPTS[script].parse_args

    def fit(run, first_epoch, setup, estimators, step, evaluate, best):
        seen.update(setup=setup, estimators=estimators, step=step)

    monkeypatch.setattr(SCRIPTS[script], "parse_args", lambda argv: seen.setdefault("args", parse(argv)))
    monkeypatch.setattr(SCRIPTS[script], "fit_estimators", fit)
    SCRIPTS[script].main([str(a) for a in argv])
    assert "step" in seen
    return seen


def objective(seen, x, y, variant):
    """The script's stage-2 objective on (x, y), rebuilt from the public helpers (PAPER.md §5):
    the loss to minimise, or for --standard-mi the mean standard MI Î(x̃; h(x̃)) to maximise."""
    args, setup, ests = seen["args"], seen["setup"], seen["estimators"]
    b = stage2.global_batch(setup.attack_batch(x, y, args.num_steps))
    if variant == "standard-mi":
        return ests["standard"].mi(b.x_adv, b.g_adv, args.va_mode).mean()
    sel = select_samples(b.logits_nat, b.logits_adv, b.y)
    if variant == "eq4-max":
        e_n, e_a = ests["natural"], ests["adversarial"]
        return sum(estimator_loss_max(e_n.mi(b.x, b.g_nat, args.va_mode), e_a.mi(b.n, b.g_adv, args.va_mode),
                                      sel.correct, attack_succeeded(b.logits_adv, b.y)))
    mi = stage2.mi_vectors(ests, b, args.va_mode)
    if variant == "eq5-paper":
        return sum(estimator_loss_paper(*mi, sel.wrong))
    return sum(estimator_loss_release(*mi, sel, cos_weight=args.cos_weight, r_weight=args.r_weight,
                                      a_r_cos_weight=args.a_r_cos_weight, a_r_sum_weight=args.a_r_sum_weight))


STEP_CASES = {"eq5-release": ("train_MI_estimator", []),
              "eq5-paper": ("train_MI_estimator", ["--objective", "paper"]),
              "eq4-max": ("train_MI_estimator_only_max", []),
              "standard-mi": ("train_MI_estimator_only_max", ["--standard-mi"])}


@pytest.mark.parametrize("variant", list(STEP_CASES))
def test_training_step_moves_the_objective_the_right_way(pre_target, tmp_path, monkeypatch, variant):
    """The script's own step, driven by Adam on one fixed batch: its loss is the §5 objective (the
    negated mean MI for --standard-mi), and a few steps lower that objective (raise the MI)."""
    script, extra = STEP_CASES[variant]
    seen = capture_step(monkeypatch, script, [*TINY, "--pre-target", pre_target, "--model-dir", tmp_path, *extra])
    step, ests = seen["step"], seen["estimators"]
    x, y = next(iter(seen["setup"].train_loader))
    maximise = variant == "standard-mi"
    ests.train()
    optimizer = torch.optim.Adam(ests.parameters(), lr=seen["args"].lr_mi)

    def measure():
        torch.manual_seed(5)  # the same PGD start, so the frozen target gives the same x̃ every time
        return objective(seen, x, y, variant).item()

    def train_step():
        torch.manual_seed(5)
        loss = step(x, y)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    before = measure()
    assert math.isfinite(before)
    assert train_step() == pytest.approx(-before if maximise else before, rel=1e-5, abs=1e-6)
    for _ in range(7):
        train_step()
    after = measure()
    assert math.isfinite(after)
    if maximise:
        assert after > before + 0.05, (before, after)
    else:
        assert after < before - 0.05, (before, after)


def test_defaults_follow_the_paper_and_the_release():
    a = train_MI_estimator.parse_args(["--pre-target", "t.pth"])
    assert (a.lr_mi, a.epochs, a.batch_size, a.lr_milestones, a.lr_gamma) == (1e-2, 25, 400, [10, 20], 0.1)
    assert (a.objective, a.cos_weight, a.r_weight, a.a_r_cos_weight, a.a_r_sum_weight) == ("release", 5, 0.5, 8, 0.1)
    assert (a.distance, a.num_steps, a.eval_steps, a.va_mode, a.va_hsize) == ("l_inf", 10, 10, "dv", 2048)
    assert a.epsilon == pytest.approx(8 / 255) and a.step_size == pytest.approx(2 / 255)
    assert a.model_dir == "checkpoints/mi_estimator" and a.va_mode == "dv"
    m = train_MI_estimator_only_max.parse_args(["--pre_target", "t.pth", "--num-steps", "20"])
    assert (m.lr_mi, m.epochs, m.batch_size, m.lr_milestones, m.lr_gamma) == (1e-2, 50, 200, [20, 30, 40], 0.5)
    assert m.eval_steps == 20 and not m.standard_mi


@pytest.mark.parametrize("script", ["train_MI_estimator", "train_MI_estimator_only_max"])
def test_missing_pre_target_flag(tmp_path, capsys, script):
    assert_user_error(run_script(capsys, script, [*TINY, "--model-dir", tmp_path]), "--pre-target")


@pytest.mark.parametrize("script", ["train_MI_estimator", "train_MI_estimator_only_max"])
def test_pre_target_of_another_architecture(pre_target, tmp_path, capsys, script):
    argv = [*TINY, "--pre-target", pre_target, "--arch", "smallcnn-nobn", "--model-dir", tmp_path]
    assert_user_error(run_script(capsys, script, argv), "--pre-target", "smallcnn-nobn")


def test_pre_target_with_another_class_count(tmp_path, capsys):
    torch.save(get_model("smallcnn", 5, 3).state_dict(), tmp_path / "five.pth")
    argv = [*TINY, "--pre-target", tmp_path / "five.pth", "--model-dir", tmp_path / "m"]
    assert_user_error(run_script(capsys, "train_MI_estimator", argv), "--pre-target", "10 classes")


@pytest.mark.parametrize("argv,fragments", [
    (["--va-mode", "mine"], ["--va-mode", "mine"]),
    (["--objective", "both"], ["--objective", "both"]),
    (["--cos-weight", "-1"], ["--cos-weight"]),
    (["--lr-mi", "0"], ["--lr-mi"]),
    (["--va-mode", "fd", "--va-fd-measure", "KL"], ["--va-fd-measure"]),
    (["--is-internal", "--is-internal-last"], ["--is-internal"]),
])
def test_bad_flags_give_one_line(tmp_path, capsys, argv, fragments):
    result = run_script(capsys, "train_MI_estimator", [*TINY, "--pre-target", "t.pth", "--model-dir", tmp_path, *argv])
    assert_user_error(result, *fragments)


def test_pre_target_missing_or_not_a_checkpoint(tmp_path, capsys):
    argv = [*TINY, "--model-dir", tmp_path / "m", "--pre-target"]
    assert_user_error(run_script(capsys, "train_MI_estimator", [*argv, tmp_path / "nope.pth"]), "--pre-target")
    (tmp_path / "junk.pth").write_text("not a checkpoint\n")
    assert_user_error(run_script(capsys, "train_MI_estimator_only_max", [*argv, tmp_path / "junk.pth"]),
                      "--pre-target")
