"""train_MIAT.py: the NAMID objective's gradients, forward count and ablations, and short runs."""
import json

import pytest
import torch

import train_MIAT
from models.estimator import build_estimator
from tests.helpers import assert_user_error, run_script, save_estimators, spy_on_pgd

HSIZE = 16
BASE = ["--dataset", "synthetic", "--arch", "smallcnn", "--train-limit", "64", "--test-limit", "32",
        "--batch-size", "32", "--epsilon", "0.1", "--num-steps", "2", "--eval-steps", "1", "--epochs", "1",
        "--va-hsize", str(HSIZE), "--no-progress", "--no-collapse-guard"]


@pytest.fixture(scope="module")
def mi_dir(tmp_path_factory):
    """Random estimators for a 3×32×32, 10-class target, saved under the release's names."""
    folder = tmp_path_factory.mktemp("mi")
    torch.manual_seed(0)
    save_estimators({k: build_estimator(3, 10, HSIZE) for k in ("natural", "adversarial")}, folder)
    std = build_estimator(3, 10, HSIZE)
    torch.save(std.local.state_dict(), folder / "local_std_model.pth")
    torch.save(std.global_.state_dict(), folder / "global_std_model.pth")
    return folder


# How each defense crafts its training examples, as in the TRADES and MART reference code: TRADES ascends
# the KL divergence from a 0.001·N(0, I) start; Standard AT and MART ascend the cross-entropy from a
# uniform start in the ε-ball.
EXPECTED_ATTACK = {"ce": ("ce", "uniform"), "trades": ("kl", "normal"), "mart": ("ce", "uniform")}


@pytest.mark.parametrize("kind", ["trades", "mart"])
def test_adv_loss_flag_picks_the_training_attack(kind, mi_dir, tmp_path, capsys, monkeypatch):
    calls = spy_on_pgd(monkeypatch, train_MIAT)
    argv = [*BASE, "--adv-loss", kind, "--mi-dir", mi_dir, "--model-dir", tmp_path]
    code, _, err = run_script(capsys, "train_MIAT", argv)
    assert code == 0, err
    assert len(calls) == 2  # two training batches; the per-epoch evaluation attacks through another name
    for call in calls:
        assert (call["loss"], call["random_start"]) == EXPECTED_ATTACK[kind]
        assert call["epsilon"] == pytest.approx(0.1) and call["num_steps"] == 2


VARIANTS = {
    "namid": [],
    "namid-t": ["--adv-loss", "trades"],
    "namid-m": ["--adv-loss", "mart"],
    "no-adv-mi": ["--no-adv-mi"],
    "no-nat-mi": ["--no-nat-mi"],
    "lam0": ["--lam", "0"],
    "release": ["--release-loss"],
    "wmim": ["--method", "wmim"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_short_run_of_every_variant_writes_its_files(variant, mi_dir, tmp_path, capsys):
    out = tmp_path / variant
    code, _, err = run_script(capsys, "train_MIAT", [*BASE, *VARIANTS[variant], "--mi-dir", mi_dir,
                                                     "--model-dir", out])
    assert code == 0, err
    for name in ("target_model.pth", "last.pth", "config.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"clean_acc", "pgd_acc", "train_loss", "l_adv"} <= set(record)
    if variant != "wmim":
        assert {"cos_nat", "cos_adv", "lam_term", "w_size", "l_mi"} <= set(record)
    else:
        assert "standard_mi" in record
    torch.load(out / "target_model.pth", weights_only=True)


def _weights_equal(module, path):
    state = torch.load(path, weights_only=True)
    own = module.state_dict()
    return own.keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in own.items())


def _spy_on_estimators(monkeypatch):
    """Record the (E_n, E_a) that each NAMID training step is given."""
    seen = []
    real = train_MIAT.namid_objective

    def spy(model, est_n, est_a, *a, **k):
        seen.append((est_n, est_a))
        return real(model, est_n, est_a, *a, **k)

    monkeypatch.setattr(train_MIAT, "namid_objective", spy)
    return seen


def test_release_flags_load_the_four_files(mi_dir, tmp_path, capsys, monkeypatch):
    # Renamed copies: only the flags say which file is which.
    flags = []
    for i, (flag, name) in enumerate((("--pre-local-n", "local_n_model.pth"), ("--pre-global-n", "global_n_model.pth"),
                                      ("--pre-local-a", "local_a_model.pth"),
                                      ("--pre-global-a", "global_a_model.pth"))):
        copy = tmp_path / f"file{i}.pth"
        copy.write_bytes((mi_dir / name).read_bytes())
        flags += [flag, copy]
    seen = _spy_on_estimators(monkeypatch)
    code, _, err = run_script(capsys, "train_MIAT", [*BASE, *flags, "--model-dir", tmp_path / "run"])
    assert code == 0, err
    assert seen
    est_n, est_a = seen[-1]
    files = dict(zip(("local_n", "global_n", "local_a", "global_a"), flags[1::2]))
    assert _weights_equal(est_n.local, files["local_n"]) and _weights_equal(est_n.global_, files["global_n"])
    assert _weights_equal(est_a.local, files["local_a"]) and _weights_equal(est_a.global_, files["global_a"])
    # The fixture's two estimators differ, so the checks above tell E_n from E_a.
    assert not _weights_equal(est_n.local, files["local_a"]) and not _weights_equal(est_n.global_, files["global_a"])


def test_mi_dir_loads_each_estimator_from_its_own_files(mi_dir, tmp_path, capsys, monkeypatch):
    seen = _spy_on_estimators(monkeypatch)
    code, _, err = run_script(capsys, "train_MIAT", [*BASE, "--mi-dir", mi_dir, "--model-dir", tmp_path])
    assert code == 0, err
    est_n, est_a = seen[-1]
    assert _weights_equal(est_n.local, mi_dir / "local_n_model.pth")
    assert _weights_equal(est_n.global_, mi_dir / "global_n_model.pth")
    assert _weights_equal(est_a.local, mi_dir / "local_a_model.pth")
    assert _weights_equal(est_a.global_, mi_dir / "global_a_model.pth")
    assert not _weights_equal(est_n.global_, mi_dir / "global_a_model.pth")


def test_warm_up_epochs_train_clean_first(mi_dir, tmp_path, capsys):
    argv = [*BASE, "--epochs", "2", "--warm-up-epochs", "1", "--mi-dir", mi_dir, "--model-dir", tmp_path]
    code, _, err = run_script(capsys, "train_MIAT", argv)
    assert code == 0, err
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["train_epsilon"] == 0 and "l_mi" not in lines[0]
    assert lines[1]["train_epsilon"] == pytest.approx(0.1) and "l_mi" in lines[1]


def test_missing_estimator_file(mi_dir, tmp_path, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "local_n_model.pth").write_bytes((mi_dir / "local_n_model.pth").read_bytes())
    result = run_script(capsys, "train_MIAT", [*BASE, "--mi-dir", partial, "--model-dir", tmp_path / "m"])
    assert_user_error(result, "--mi-dir", "global_n_model.pth")


def test_estimator_of_another_width(mi_dir, tmp_path, capsys):
    argv = [*BASE, "--va-hsize", "8", "--mi-dir", mi_dir, "--model-dir", tmp_path]
    assert_user_error(run_script(capsys, "train_MIAT", argv), "--mi-dir", "--va-hsize")


def test_estimator_of_another_internal_variant(mi_dir, tmp_path, capsys):
    argv = [*BASE, "--is-internal", "--mi-dir", mi_dir, "--model-dir", tmp_path]
    assert_user_error(run_script(capsys, "train_MIAT", argv), "--mi-dir", "global_n_model.pth")


def test_estimator_flags_must_match_stage_2(mi_dir, tmp_path, capsys):
    import shutil

    folder = tmp_path / "mi"
    shutil.copytree(mi_dir, folder)
    (folder / "config.json").write_text(json.dumps({"va_mode": "dv", "va_hsize": HSIZE, "is_internal": False,
                                                    "is_internal_last": False}))
    argv = [*BASE, "--mi-dir", folder, "--model-dir", tmp_path / "m"]
    assert_user_error(run_script(capsys, "train_MIAT", [*argv, "--va-mode", "nce"]), "--va-mode", "'dv'")
    code, _, err = run_script(capsys, "train_MIAT", argv)
    assert code == 0, err


def test_not_a_checkpoint(mi_dir, tmp_path, capsys):
    (tmp_path / "bad.pth").write_text("nope")
    flags = ["--pre-local-n", tmp_path / "bad.pth", "--pre-global-n", mi_dir / "global_n_model.pth",
             "--pre-local-a", mi_dir / "local_a_model.pth", "--pre-global-a", mi_dir / "global_a_model.pth"]
    assert_user_error(run_script(capsys, "train_MIAT", [*BASE, *flags, "--model-dir", tmp_path / "m"]),
                      "--pre-local-n")


@pytest.mark.parametrize("argv,fragment", [
    (["--alpha", "-1"], "--alpha"),
    ([], "--mi-dir"),
    (["--no-adv-mi", "--no-nat-mi", "--mi-dir", "x"], "--no-adv-mi"),
    (["--va-mode", "mine", "--mi-dir", "x"], "--va-mode"),
    (["--method", "wmim", "--lam", "0", "--mi-dir", "x"], "--lam"),
    (["--method", "wmim", "--no-adv-mi", "--mi-dir", "x"], "--no-adv-mi"),
    (["--method", "wmim", "--pre-local-n", "a", "--pre-global-n", "b", "--pre-local-a", "c", "--pre-global-a", "d"],
     "--pre-local-n"),
    (["--method", "wmim"], "--mi-dir"),
    (["--release-loss", "--lam", "0.1", "--mi-dir", "x"], "--release-loss"),
    (["--method", "wmim", "--release-selection", "--mi-dir", "x"], "--release-selection"),
    (["--method", "wmim", "--release-passes", "--mi-dir", "x"], "--release-passes"),
])
def test_bad_flags(argv, fragment, tmp_path, capsys):
    assert_user_error(run_script(capsys, "train_MIAT", [*BASE, *argv, "--model-dir", tmp_path]), fragment)


def test_paper_defaults():
    args = train_MIAT.parse_args(["--mi-dir", "x"])
    assert (args.alpha, args.lam, args.adv_loss, args.method, args.warm_up_epochs) == (5.0, 0.1, "ce", "namid", 0)
    assert args.epsilon == pytest.approx(8 / 255) and args.num_steps == 10 and args.va_mode == "dv"


def test_gradient_balance_is_measured_on_batches_spread_over_each_adversarial_epoch(mi_dir, tmp_path, capsys,
                                                                                   monkeypatch):
    measured = []
    real = train_MIAT.namid_objective

    def spy(*a, measure_grads=False, **k):
        measured.append(measure_grads)
        return real(*a, measure_grads=measure_grads, **k)

    monkeypatch.setattr(train_MIAT, "namid_objective", spy)
    out = tmp_path / "run"
    argv = [*BASE, "--train-limit", "160", "--val-size", "32", "--epochs", "3", "--warm-up-epochs", "1",
            "--balance-batches", "2", "--mi-dir", mi_dir, "--model-dir", out]
    code, _, err = run_script(capsys, "train_MIAT", argv)
    assert code == 0, err
    assert measured == [True, False, True, False] * 2  # 4 batches an epoch: the 1st and the 3rd, epochs 2 and 3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "grad_ratio" not in records[0]  # a clean warm-up epoch has no MI term
    for r in records[1:]:
        assert 0 <= r["balance_batches"] <= 2
        assert all(k in r for k in ("grad_adv", "grad_mi", "grad_ratio", "grad_ratio_max", "grad_cos"))
        if r["balance_batches"]:
            assert r["grad_adv"] > 0 and r["grad_ratio_max"] >= r["grad_ratio"] > 0
        else:  # every measured batch had an empty W: no reading, rather than a 0
            assert r["grad_ratio"] is None
    assert err.count("the MI loss dominates") <= 2  # at most once per epoch


def test_balance_flags_reach_the_monitor(mi_dir, tmp_path, capsys, monkeypatch):
    seen = []
    real = train_MIAT.BalanceMonitor
    monkeypatch.setattr(train_MIAT, "BalanceMonitor", lambda *a, **k: seen.append((a, k)) or real(*a, **k))
    argv = [*BASE, "--alpha", "0.7", "--balance-limit", "2.5", "--balance-batches", "3", "--mi-grad-clip", "0.2",
            "--mi-dir", mi_dir, "--model-dir", tmp_path]
    code, _, err = run_script(capsys, "train_MIAT", argv)
    assert code == 0, err
    ((a, k),) = seen
    assert a == (3, 2.5, 0.2) and k["guard"] is False and "--alpha (now 0.7)" in k["advice"]
    defaults = train_MIAT.parse_args(["--mi-dir", "x"])
    assert (defaults.balance_limit, defaults.balance_batches, defaults.mi_grad_clip) == (0.5, 8, None)
    assert not defaults.no_collapse_guard


def test_the_cap_bounds_every_step_of_a_run(mi_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*BASE, "--train-limit", "160", "--alpha", "50", "--mi-grad-clip", "0.1", "--mi-dir", mi_dir,
            "--model-dir", out]
    code, _, err = run_script(capsys, "train_MIAT", argv)
    assert code == 0, err
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if record["balance_batches"]:  # measured on every batch with a non-empty W
        assert record["grad_ratio_applied_max"] <= 0.1 * (1 + 1e-5)


def test_collapse_guard_stops_the_run_and_keeps_its_files(mi_dir, tmp_path, capsys, monkeypatch):
    import utils.training.loop

    clean = iter([40.0, 55.0, 9.0, 9.0])  # the third epoch falls to chance

    def fake_evaluate(*a, **k):
        return {"clean_acc": next(clean), "pgd_acc": 5.0}

    monkeypatch.setattr(utils.training.loop, "evaluate", fake_evaluate)
    out = tmp_path / "run"
    guarded = [a for a in BASE if a != "--no-collapse-guard"]
    argv = [*guarded, "--epochs", "4", "--warm-up-epochs", "1", "--mi-dir", mi_dir, "--model-dir", out]
    code, _, err = run_script(capsys, "train_MIAT", argv)
    lines = err.strip().splitlines()
    assert code == 3 and "Traceback" not in err
    assert "stopped: epoch 3: held-out clean accuracy fell to 9.00 %" in lines[-1] and "--alpha" in lines[-1]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert torch.load(out / "last.pth", weights_only=True)["epoch"] == 2
    assert [r["best"] for r in records] == [True, True] and (out / "target_model.pth").is_file()


def test_release_compat_is_recorded_and_resume_refuses_a_change(mi_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_script(capsys, "train_MIAT", [*BASE, "--release-compat", "--mi-dir", mi_dir,
                                                     "--model-dir", out])
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["release_compat"] and all(config[f"release_{q}"] for q in
                                            ("selection", "dv_mask", "nce_mask", "batch_bounds", "passes", "start"))
    resumed = run_script(capsys, "train_MIAT", [*BASE, "--epochs", "2", "--release-compat", "--release-start",
                                                "--mi-dir", mi_dir, "--model-dir", out, "--resume"])
    assert resumed[0] == 0, resumed[2]
    assert_user_error(run_script(capsys, "train_MIAT", [*BASE, "--epochs", "3", "--mi-dir", mi_dir,
                                                        "--model-dir", out, "--resume"]), "--release-")


def test_release_start_reaches_the_training_attack(mi_dir, tmp_path, capsys, monkeypatch):
    calls = spy_on_pgd(monkeypatch, train_MIAT)
    code, _, err = run_script(capsys, "train_MIAT", [*BASE, "--release-start", "--mi-dir", mi_dir,
                                                     "--model-dir", tmp_path])
    assert code == 0, err
    training = [c for c in calls if c["num_steps"] == 2]
    assert training and all(c["random_start"] == "normal" for c in training)
