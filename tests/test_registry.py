"""The attack registry (utils/attacks/registry.py): names, options, the robust mask, and the
properties every attack it builds must have.

A tiny MLP (with BatchNorm, so that eval mode matters) is trained once on synthetic
10-class 1×8×8 images; every attack must keep to its budget, leave its input and the
model's state alone, and actually lower the accuracy."""
import warnings

import pytest
import torch

from tests.attack_helpers import N_CLASSES, train_tiny
from utils.attacks.base import lp_norm
from utils.attacks.cw import cw_l2
from utils.attacks.ddn import ddn
from utils.attacks.registry import GROUPS, build_attack, expand_attack_names, robust_mask


@pytest.fixture(scope="module")
def tiny():
    return train_tiny()


# name, epsilon, options: budgets large enough for the tiny model to lose accuracy, steps
# cut down where the defaults would be slow.
CASES = [
    ("pgd10", 0.05, {}),
    ("l2-pgd10", 0.5, {}),
    ("aa", 0.05, {"version": "custom", "attacks_to_run": ["apgd-ce"], "n_iter": 10}),
    ("fwa10", 0.1, {}),
    ("fwa10", 0.1, {"method": "pgd", "lr": 0.05}),
    ("tidim", 0.05, {"steps": 10, "kernel_size": 5, "sigma": 1.0}),
    ("mifgsm", 0.05, {}),
    ("cw", 0.5, {"steps": 10, "binary_search_steps": 3}),
    ("ddn", 0.5, {}),
]


@pytest.mark.parametrize("name,epsilon,options", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_attack_keeps_budget_input_and_model_state(tiny, name, epsilon, options):
    model, x, y = tiny
    attack = build_attack(name, epsilon=epsilon, **options)
    model.train()
    frozen = model[1].weight
    frozen.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    stats = [b.clone() for b in model.buffers()]
    x_before = x.clone()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # AutoAttack's own trust checks
            x_adv = attack(model, x, y)
        assert model.training and all(m.training for m in model.modules())
        assert [p.requires_grad for p in model.parameters()] == flags
        assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))
    finally:
        frozen.requires_grad_(True)
        model.eval()
    assert torch.equal(x, x_before)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    if attack.budget != "wasserstein" and not attack.minimum_norm:
        assert (lp_norm(x_adv - x, attack.norm) <= epsilon + 1e-6).all()

    robust = robust_mask(model, x, y, x_adv, attack)
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    assert not (robust & ~clean).any()
    assert robust.float().mean() < clean.float().mean(), f"{name} did not lower the accuracy"


def test_minimum_norm_attacks_count_only_within_epsilon(tiny):
    model, x, y = tiny
    with torch.no_grad():
        pred = model(x).argmax(1)
    # A "perfect" minimum-norm answer far outside ε: another class's image, misclassified.
    other = torch.roll(torch.arange(len(x)), 1)
    x_far = x[other]
    with torch.no_grad():
        far_wrong = model(x_far).argmax(1) != y
    far = (x_far - x).flatten(1).norm(dim=1) > 0.5
    case = (pred == y) & far_wrong & far
    assert case.sum() >= 3

    cw = build_attack("cw", epsilon=0.5)
    assert cw.minimum_norm
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # out of ε is expected of CW: no warning
        mask = robust_mask(model, x, y, x_far, cw)
    assert mask[case].all()
    assert not robust_mask(model, x, y, x_far, build_attack("ddn", epsilon=1e3))[case].any()

    # For a fixed-budget attack the same examples are a bug: warned about and not counted.
    with pytest.warns(UserWarning, match="outside"):
        mask = robust_mask(model, x, y, x_far, build_attack("l2-pgd40", epsilon=0.5))
    assert mask[case].all()


def test_cw_and_ddn_return_smallest_successful_or_input(tiny):
    model, x, y = tiny
    for x_adv in (cw_l2(model, x, y, steps=10, binary_search_steps=3), ddn(model, x, y)):
        with torch.no_grad():
            wrong = model(x_adv).argmax(1) != y
        unchanged = (x_adv == x).flatten(1).all(1)
        assert (wrong | unchanged).all()
        assert wrong.float().mean() > 0.5
        # Counted within a tiny ε, almost nothing breaks; within a huge one, all that was found does.
        l2 = (x_adv - x).flatten(1).norm(dim=1)
        attack = build_attack("ddn", epsilon=1e-3)
        assert robust_mask(model, x, y, x_adv, attack).sum() >= (wrong & (l2 > 1e-3 + 1e-6)).sum()


def test_expand_attack_names():
    assert expand_attack_names("pgd40,all-l2") == ["pgd40", "l2-pgd40", "cw", "ddn"]
    assert expand_attack_names("all-linf") == ["pgd40", "aa", "fwa40", "tidim"]
    assert expand_attack_names(" PGD7 , pgd7,all-l2,cw ") == ["pgd7", "l2-pgd40", "cw", "ddn"]
    assert expand_attack_names(["fwa3", "mifgsm"]) == ["fwa3", "mifgsm"]
    everything = expand_attack_names("all")
    assert everything == list(GROUPS["all-linf"] + GROUPS["all-l2"]) + ["mifgsm"]
    for bad in ("pgd", "pgd0", "fgsm", "l2-aa", "pgd40,bogus"):
        with pytest.raises(ValueError) as err:
            expand_attack_names(bad)
        assert "valid names" in str(err.value) and "pgdK" in str(err.value)
    with pytest.raises(ValueError, match="'bogus'"):
        expand_attack_names("pgd40,bogus")


def test_build_attack_metadata_and_options():
    expected = {
        "pgd40": ("linf", 8 / 255, False, "linf"),
        "aa": ("linf", 8 / 255, False, "linf"),
        "fwa40": ("linf", 8 / 255, False, "wasserstein"),
        "tidim": ("linf", 8 / 255, False, "linf"),
        "mifgsm": ("linf", 8 / 255, False, "linf"),
        "l2-pgd40": ("l2", 0.5, False, "l2"),
        "cw": ("l2", 0.5, True, "l2"),
        "ddn": ("l2", 0.5, True, "l2"),
    }
    for name in expand_attack_names("all"):
        attack = build_attack(name)
        assert (attack.norm, attack.epsilon, attack.minimum_norm, attack.budget) == expected[name]
        assert attack.name == name
    assert build_attack("PGD10", epsilon=0.1).epsilon == 0.1
    assert build_attack("cw", norm_default_eps={"linf": 0.1, "l2": 1.0}).epsilon == 1.0
    assert build_attack("aa", norm="l2").norm == "l2"
    with pytest.raises(ValueError, match="takes no option"):
        build_attack("pgd40", stepsize=0.1)
    with pytest.raises(ValueError, match="takes no option"):
        build_attack("cw", epsilon=0.5, kappa=1.0)
    with pytest.raises(ValueError, match="FWA method"):
        build_attack("fwa40", method="sinkhorn")
    with pytest.raises(ValueError, match="unknown attack"):
        build_attack("deepfool")


def test_pgd_entry_uses_quarter_epsilon_steps(tiny):
    model, x, y = tiny
    one_step = build_attack("pgd1", epsilon=0.08, random_start=False)
    x_adv = one_step(model, x, y)
    step = (x_adv - x).abs().flatten(1).amax(1)
    # Every sample moves (a trained MLP has no all-zero input gradient), by exactly ε/4.
    assert (step > 0).all()
    assert torch.allclose(step, torch.tensor(0.02), atol=1e-6)
    l2 = build_attack("l2-pgd1", epsilon=0.8, random_start=False)(model, x, y)
    assert torch.allclose((l2 - x).flatten(1).norm(dim=1), torch.tensor(0.2), atol=1e-2)


def test_robust_mask_never_exceeds_clean_accuracy(tiny):
    model, x, y = tiny
    wrong_labels = (y + 1) % N_CLASSES
    attack = build_attack("pgd40", epsilon=0.03)
    # Unchanged inputs under wrong labels: nothing is robust, and nothing is out of budget.
    assert not robust_mask(model, x, wrong_labels, x.clone(), attack).any()
    # Out of [0, 1] counts as not broken, with a warning.
    with pytest.warns(UserWarning):
        mask = robust_mask(model, x, y, x + 2.0, build_attack("fwa40"))
    with torch.no_grad():
        assert torch.equal(mask, model(x).argmax(1) == y)


def test_fwa_defaults_are_the_release_projected_variant(monkeypatch):
    import utils.attacks.registry as registry

    seen = {}

    def spy(name):
        def fn(model, x, y, epsilon, steps=40, kernel_size=5, dual_iters=15, return_plan=False):
            seen[name] = (steps, kernel_size)
            return x
        return fn

    monkeypatch.setattr(registry, "fwa_pgd", spy("pgd"))
    monkeypatch.setattr(registry, "fwa_fw", spy("fw"))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    x, y = torch.rand(2, 1, 2, 2), torch.zeros(2, dtype=torch.long)
    registry.build_attack("fwa40")(model, x, y)
    registry.build_attack("fwa-fw40")(model, x, y)
    assert seen["pgd"] == (40, 4)  # the release's kernel
    assert seen["fw"] == (40, 5)
    assert expand_attack_names("fwa-fw7") == ["fwa-fw7"]
