"""train_MIAT.py: the NAMID objective's gradients, forward count and ablations, and short runs."""
import json
from types import SimpleNamespace

import pytest
import torch

import train_MIAT
from models import get_model
from models.estimator import build_estimator
from tests.helpers import assert_user_error, run_script, spy_on_pgd
from utils.attacks.pgd import pgd
from utils.estimators import save_estimators
from utils.patterns import select_samples
from utils.release_compat import Quirks

HSIZE = 16
BASE = ["--dataset", "synthetic", "--arch", "smallcnn", "--train-limit", "64", "--test-limit", "32",
        "--batch-size", "32", "--epsilon", "0.1", "--num-steps", "2", "--eval-steps", "1", "--epochs", "1",
        "--va-hsize", str(HSIZE), "--no-progress"]


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


def objective_args(**overrides):
    args = dict(adv_loss="ce", beta=6.0, alpha=5.0, lam=0.1, no_adv_mi=False, no_nat_mi=False, release_loss=False,
                mi_mode="dv", is_internal=False, is_internal_last=False, quirks=Quirks())
    args.update(overrides)
    return SimpleNamespace(**args)


def setup(seed=0, n=16):
    torch.manual_seed(seed)
    model = get_model("smallcnn", 10, 3)
    # SmallCNN's last layer starts at zero (TRADES' init): give it varied predictions.
    torch.nn.init.normal_([m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].weight)
    est_n, est_a = (train_MIAT.freeze(build_estimator(3, 10, HSIZE)) for _ in range(2))
    x = torch.rand(n, 3, 32, 32)
    y = torch.randint(0, 10, (n,))
    return model, est_n, est_a, x, y


def wrong_batch(model, x):
    """Samples whose eval-mode prediction changes under noise, labelled by the prediction on x: W is all of them."""
    model.eval()
    x_adv = (x + 0.3 * torch.rand_like(x)).clamp(0, 1)
    with torch.no_grad():
        p_nat = model(x).argmax(1)
        p_adv = model(x_adv).argmax(1)
    keep = p_nat != p_adv
    return x[keep], x_adv[keep], p_nat[keep]


def test_forward_count_is_two_plus_attack():
    model, est_n, est_a, x, y = setup()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    model.train()
    x_adv = pgd(model, x, y, 0.1, 0.025, 3, "linf")
    assert len(calls) == 3
    calls.clear()
    train_MIAT.namid_objective(model, est_n, est_a, x, x_adv, y, objective_args(adv_loss="trades"))
    assert len(calls) == 2  # the release ran the target seven times per step


def test_local_nets_see_each_pattern_once():
    model, est_n, est_a, x, y = setup()
    counts = {"n": 0, "a": 0}
    est_n.local.register_forward_hook(lambda *a: counts.__setitem__("n", counts["n"] + 1))
    est_a.local.register_forward_hook(lambda *a: counts.__setitem__("a", counts["a"] + 1))
    train_MIAT.namid_objective(model, est_n, est_a, x, (x + 0.05).clamp(0, 1), y, objective_args())
    assert counts == {"n": 1, "a": 1}


def test_gradients_reach_theta_only_through_the_global_nets(monkeypatch):
    torch.manual_seed(3)
    model, est_n, est_a, x, _ = setup(n=128)
    x, x_adv, y = wrong_batch(model, x)
    assert len(y) >= 4
    args = objective_args(alpha=1.0)
    _, _, extra = train_MIAT.namid_objective(model, est_n, est_a, x, x_adv, y, args)
    assert extra["w_size"] == len(y)

    def grads(alpha):
        model.zero_grad()
        args.alpha = alpha
        loss, _, _ = train_MIAT.namid_objective(model, est_n, est_a, x, x_adv, y, args)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    def mi_grad():
        return grads(1.0) - grads(0.0)  # the MI part alone

    assert mi_grad().abs().sum() > 0
    assert all(p.grad is None for p in est_n.parameters()) and all(p.grad is None for p in est_a.parameters())
    # Cut the global branch: no MI gradient may reach θ any other way.
    real = train_MIAT.target_outputs
    monkeypatch.setattr(train_MIAT, "target_outputs", lambda m, v, layer: tuple(t.detach() if i else t for i, t in
                                                                              enumerate(real(m, v, layer))))
    assert mi_grad().abs().max() < 1e-6


def test_estimators_unchanged_by_a_training_step():
    model, est_n, est_a, x, y = setup()
    before = [{k: v.clone() for k, v in e.state_dict().items()} for e in (est_n, est_a)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    x_adv = pgd(model, x, y, 0.1, 0.025, 2, "linf")
    loss, _, _ = train_MIAT.namid_objective(model, est_n, est_a, x, x_adv, y, objective_args())
    loss.backward()
    opt.step()
    for est, state in zip((est_n, est_a), before):
        assert not est.training
        for k, v in est.state_dict().items():
            assert torch.equal(v, state[k]), k


def test_empty_w_gives_zero_mi_loss():
    model, est_n, est_a, x, _ = setup()
    model.train()
    with torch.no_grad():
        y = (model(x).argmax(1) + 1) % 10  # nothing is correct, so W is empty
    loss, _, extra = train_MIAT.namid_objective(model, est_n, est_a, x, (x + 0.05).clamp(0, 1), y, objective_args())
    assert extra["w_size"] == 0 and extra["l_mi"] == 0
    assert torch.isfinite(loss) and torch.allclose(loss.detach(), extra["l_adv"])
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_each_ablation_removes_exactly_its_terms():
    torch.manual_seed(5)
    model, est_n, est_a, x, _ = setup(n=128)
    x, x_adv, y = wrong_batch(model, x)
    model.eval()  # the same logits for every variant

    def terms(**flags):
        return train_MIAT.namid_objective(model, est_n, est_a, x, x_adv, y, objective_args(**flags))[2]

    full = terms()
    assert full["cos_nat"] > 0 and full["cos_adv"] > 0 and full["lam_term"] != 0
    no_adv, no_nat = terms(no_adv_mi=True), terms(no_nat_mi=True)
    assert no_adv["cos_adv"] == 0 and torch.allclose(no_adv["cos_nat"], full["cos_nat"])
    assert no_nat["cos_nat"] == 0 and torch.allclose(no_nat["cos_adv"], full["cos_adv"])
    # the λ term splits into its adversarial and natural halves
    assert torch.allclose(no_adv["lam_term"] + no_nat["lam_term"], full["lam_term"], atol=1e-6)
    for variant in (terms(lam=0.0), terms(release_loss=True)):
        assert variant["lam_term"] == 0
        assert torch.allclose(variant["cos_nat"], full["cos_nat"])
        assert torch.allclose(variant["cos_adv"], full["cos_adv"])
    total = train_MIAT.namid_objective(model, est_n, est_a, x, x_adv, y, objective_args())
    assert torch.allclose(total[0], full["l_adv"] + 5.0 * (full["cos_nat"] + full["cos_adv"] + full["lam_term"]))


def _reference_l_adv(kind, logits_nat, logits_adv, y, beta):
    from utils import losses

    if kind == "trades":
        return losses.trades_loss(logits_nat, logits_adv, y, beta)
    if kind == "mart":
        return losses.mart_loss(logits_nat, logits_adv, y, beta)
    return torch.nn.functional.cross_entropy(logits_adv, y)


@pytest.mark.parametrize("kind", ["ce", "trades", "mart"])
def test_adv_loss_flag_picks_l_adv(kind):
    model, est_n, est_a, x, y = setup()
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    model.eval()  # the same logits here and inside the objective
    with torch.no_grad():
        logits_nat, logits_adv = model(x), model(x_adv)
    expected = _reference_l_adv(kind, logits_nat, logits_adv, y, beta=3.0)
    if kind != "ce":  # the losses differ on this batch, so the comparison tells them apart
        assert not torch.allclose(expected, _reference_l_adv("ce", logits_nat, logits_adv, y, 3.0))
    args = objective_args(adv_loss=kind, beta=3.0)
    extra = train_MIAT.namid_objective(model, est_n, est_a, x, x_adv, y, args)[2]
    torch.testing.assert_close(extra["l_adv"], expected)
    std = train_MIAT.freeze(build_estimator(3, 10, HSIZE))
    extra = train_MIAT.wmim_loss(model, std, x, x_adv, y, args)[2]
    torch.testing.assert_close(extra["l_adv"], expected)


@pytest.mark.parametrize("mode", ["dv", "nce"])
def test_wmim_loss_is_l_adv_minus_alpha_times_mean_standard_mi(mode):
    """WMIM maximises Î(x̃; h(x̃)): the MI term enters the loss with a minus sign."""
    from utils.mi import mi_per_sample

    model, _, _, x, y = setup()
    std = train_MIAT.freeze(build_estimator(3, 10, HSIZE))
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    model.eval()
    with torch.no_grad():
        logits_adv = model(x_adv)
        mi = mi_per_sample(std.local(x_adv), std.global_(logits_adv), mode).mean()
        l_adv = torch.nn.functional.cross_entropy(logits_adv, y)
    assert mi.abs() > 1e-3  # a sign flip must show
    loss, logits, extra = train_MIAT.wmim_loss(model, std, x, x_adv, y, objective_args(alpha=2.0, mi_mode=mode))
    torch.testing.assert_close(extra["standard_mi"], mi)
    torch.testing.assert_close(loss.detach(), l_adv - 2.0 * mi)
    torch.testing.assert_close(logits.detach(), logits_adv)


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
    (folder / "config.json").write_text(json.dumps({"mi_mode": "dv", "va_hsize": HSIZE, "is_internal": False,
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
    assert args.epsilon == pytest.approx(8 / 255) and args.num_steps == 10 and args.mi_mode == "dv"


def test_gradient_balance_is_logged_once_per_adversarial_epoch(mi_dir, tmp_path, capsys, monkeypatch):
    measured = []
    real = train_MIAT.namid_objective

    def spy(*a, measure_grads=False, **k):
        measured.append(measure_grads)
        return real(*a, measure_grads=measure_grads, **k)

    monkeypatch.setattr(train_MIAT, "namid_objective", spy)
    out = tmp_path / "run"
    argv = [*BASE, "--epochs", "3", "--warm-up-epochs", "1", "--mi-dir", mi_dir, "--model-dir", out]
    code, _, err = run_script(capsys, "train_MIAT", argv)
    assert code == 0, err
    batches = len(measured) // 2
    assert measured == ([True] + [False] * (batches - 1)) * 2  # the first batch of epochs 2 and 3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "grad_adv" not in records[0]  # a clean warm-up epoch has no MI term
    for r in records[1:]:
        assert r["grad_adv"] > 0 and r["grad_mi"] >= 0
        assert r["grad_ratio"] == pytest.approx(r["grad_mi"] / r["grad_adv"], rel=1e-5)
    # α = 5 on random estimators: the line that names --alpha appears once per epoch above the limit.
    above = sum(r["grad_ratio"] > 10 for r in records[1:])
    assert err.count("consider a smaller --alpha") == above


def test_balance_warning_names_alpha(capsys):
    train_MIAT.warn_if_unbalanced({"grad_ratio": torch.tensor(12.5)}, alpha=5.0)
    train_MIAT.warn_if_unbalanced({"grad_ratio": torch.tensor(9.5)}, alpha=5.0)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "12.5" in lines[0] and "--alpha (now 5)" in lines[0]


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


def test_release_selection_picks_w_by_the_softmax_over_the_batch(monkeypatch):
    model, est_n, est_a, x, y = setup(n=64)
    model.eval()  # no dropout: both calls see the same logits
    x_adv = (x + 0.3 * torch.rand_like(x)).clamp(0, 1)
    with torch.no_grad():
        y = model(x).argmax(1)
        expected = select_samples(model(x), model(x_adv), y, over_batch=True).wrong
        ours = select_samples(model(x), model(x_adv), y).wrong
    assert not torch.equal(expected, ours)
    _, _, extra = train_MIAT.namid_objective(model, est_n, est_a, x, x_adv, y,
                                             objective_args(quirks=Quirks(selection=True)))
    assert extra["w_size"] == expected.sum()


def test_release_start_reaches_the_training_attack(mi_dir, tmp_path, capsys, monkeypatch):
    calls = spy_on_pgd(monkeypatch, train_MIAT)
    code, _, err = run_script(capsys, "train_MIAT", [*BASE, "--release-start", "--mi-dir", mi_dir,
                                                     "--model-dir", tmp_path])
    assert code == 0, err
    training = [c for c in calls if c["num_steps"] == 2]
    assert training and all(c["random_start"] == "normal" for c in training)
