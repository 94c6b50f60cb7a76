"""The evaluation suite of the paper (§7 of PAPER.md), every attack behind one call.

``build_attack("pgd40")`` gives an :class:`Attack`; ``attack(model, x, y)`` gives x_adv.
Names:
- ``pgdK``: L∞ PGD, K steps of ε/4 from a uniform random start (the paper's PGD-40).
- ``l2-pgdK``: the same in L2; the step is ε/4 as well, the paper's one stated rule.
- ``aa``: AutoAttack, standard version (``version="release"`` for the release's 40 steps).
- ``fwaK``: Wasserstein attack with K steps, by default the release's: projected gradient on
  the transport plan with the exact dual projection, kernel 4, lr 0.007, 15 dual iterations
  (``method="fw"`` or the name ``fwa-fwK`` gives the Frank–Wolfe variant of Wu et al.).
  ε is the Wasserstein radius, relative to the total pixel mass.
- ``tidim``, ``mifgsm``: momentum attacks (L∞).
- ``cw``, ``ddn``: minimum-norm L2 attacks, counted as successful only within ε.
Groups: ``all-linf`` (pgd40, aa, fwa40, tidim), ``all-l2`` (l2-pgd40, cw, ddn), ``all``.
Keyword options of :func:`build_attack` go to the attack function (e.g. ``step_size``).
"""
import inspect
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .autoattack import autoattack
from .base import attack_mode, canonical_norm, lp_norm, unwrap
from .cw import cw_l2
from .ddn import ddn
from .fwa import fwa_fw, fwa_pgd
from .tidim import mifgsm, tidim

DEFAULT_EPS = {"linf": 8 / 255, "l2": 0.5}
GROUPS = {
    "all-linf": ("pgd40", "aa", "fwa40", "tidim"),
    "all-l2": ("l2-pgd40", "cw", "ddn"),
}
GROUPS["all"] = GROUPS["all-linf"] + GROUPS["all-l2"] + ("mifgsm",)
VALID_NAMES = "pgdK, l2-pgdK, fwaK, fwa-fwK (K ≥ 1 steps), aa, tidim, mifgsm, cw, ddn; groups " + ", ".join(GROUPS)
# Slack for float rounding when a perturbation is checked against its budget.
BUDGET_TOL = 1e-6
# Options of the lead's pgd() that a caller may set (num_steps and norm come from the name).
PGD_OPTIONS = ("step_size", "random_start", "generator", "loss")

Runner = Callable[[nn.Module, torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass
class Attack:
    """One named attack: ``attack(model, x, y)`` returns x_adv.

    ``budget`` is what ε bounds: ``"linf"``/``"l2"`` (= ``norm``) or ``"wasserstein"`` (FWA,
    which sits in the L∞ table but is not checked against an Lp ball)."""

    name: str
    norm: str
    epsilon: float
    minimum_norm: bool
    budget: str
    run: Runner = field(repr=False)
    # True when the run itself ignores ε (CW's binary search): one run then counts every budget.
    epsilon_free: bool = False

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 epsilon: Optional[float] = None) -> torch.Tensor:
        eps = self.epsilon if epsilon is None else float(epsilon)
        with attack_mode(unwrap(model)):
            return self.run(model, x, y, eps)


def _parse(name: str) -> Tuple[str, Optional[int]]:
    """(kind, steps) for one attack name, or ValueError."""
    key = name.strip().lower()
    if key in ("aa", "tidim", "mifgsm", "cw", "ddn"):
        return key, None
    match = re.fullmatch(r"(pgd|l2-pgd|fwa|fwa-fw)(\d+)", key)
    if match and int(match.group(2)) >= 1:
        return match.group(1), int(match.group(2))
    raise ValueError(f"unknown attack {name!r}; valid names: {VALID_NAMES}")


def expand_attack_names(names: Union[str, Sequence[str]]) -> List[str]:
    """``"pgd40,all-l2"`` → ``["pgd40", "l2-pgd40", "cw", "ddn"]``: groups expanded, names
    checked and lower-cased, repeats dropped (first one kept)."""
    parts = names.split(",") if isinstance(names, str) else list(names)
    out: List[str] = []
    for part in parts:
        key = part.strip().lower()
        if not key:
            continue
        for name in GROUPS.get(key, (key,)):
            _parse(name)
            if name not in out:
                out.append(name)
    return out


def _check_options(name: str, options: Dict, allowed) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"attack {name!r} takes no option(s) {unknown}; it takes {sorted(allowed)}")


def _parameters(fn: Callable, fixed: Sequence[str]) -> List[str]:
    skip = {"model", "x", "y", "epsilon", *fixed}
    return [p for p in inspect.signature(fn).parameters if p not in skip]


def build_attack(name: str, *, epsilon: Optional[float] = None,
                 norm_default_eps: Optional[Dict[str, float]] = None, **options) -> Attack:
    """The attack called ``name`` (module docstring), with budget ``epsilon`` (default: the
    norm's entry of ``norm_default_eps``, 8/255 for L∞ and 0.5 for L2)."""
    kind, steps = _parse(name)
    defaults = DEFAULT_EPS if norm_default_eps is None else norm_default_eps
    label = name.strip().lower()

    if kind in ("pgd", "l2-pgd"):
        norm = "linf" if kind == "pgd" else "l2"
        _check_options(label, options, PGD_OPTIONS)

        def run(model, x, y, eps):
            # Imported here: pgd.py is the project's shared loop and may import this package.
            from .pgd import pgd

            opts = dict(options)
            step = opts.pop("step_size", None)
            return pgd(model, x, y, eps, eps / 4 if step is None else step, steps, norm=norm, **opts)

        minimum, budget = False, norm
    elif kind in ("fwa", "fwa-fw"):
        norm, minimum, budget = "linf", False, "wasserstein"
        method = options.pop("method", "fw" if kind == "fwa-fw" else "pgd")
        if method == "pgd":
            options.setdefault("kernel_size", 4)  # the release's neighbourhood
        targets = {"fw": fwa_fw, "pgd": fwa_pgd}
        if method not in targets:
            raise ValueError(f"unknown FWA method {method!r}; expected 'fw' or 'pgd'")
        fn = targets[method]
        _check_options(label, options, _parameters(fn, ("steps", "return_plan")))

        def run(model, x, y, eps):
            return fn(model, x, y, eps, steps=steps, **options)
    elif kind == "aa":
        norm = canonical_norm(options.get("norm", "linf"))
        minimum, budget = False, norm
        _check_options(label, options, _parameters(autoattack, ()))

        def run(model, x, y, eps):
            return autoattack(model, x, y, eps, **options)
    elif kind in ("tidim", "mifgsm"):
        fn = tidim if kind == "tidim" else mifgsm
        norm, minimum, budget = "linf", False, "linf"
        _check_options(label, options, _parameters(fn, ()))

        def run(model, x, y, eps):
            return fn(model, x, y, eps, **options)
    elif kind == "cw":
        norm, minimum, budget = "l2", True, "l2"
        _check_options(label, options, _parameters(cw_l2, ()))

        def run(model, x, y, eps):
            # Minimum-norm: ε only enters when the result is counted (robust_mask).
            return cw_l2(model, x, y, **options)
    else:
        norm, minimum, budget = "l2", True, "l2"
        _check_options(label, options, _parameters(ddn, ("init_norm",)))

        def run(model, x, y, eps):
            # DDN's norm moves by a factor 1 ± γ per iteration: started at 1, 20 iterations never
            # get below 1.05·0.95^19 ≈ 0.40. Started at ε, it searches around the budget it is counted in.
            return ddn(model, x, y, init_norm=eps, **options)

    eps = defaults[norm] if epsilon is None else float(epsilon)
    return Attack(name=label, norm=norm, epsilon=eps, minimum_norm=minimum, budget=budget, run=run,
                  epsilon_free=kind == "cw")


@dataclass
class Outcome:
    """What an adversarial batch did to one model, per example (on the batch's device).

    ``distance`` is the Lp size of the perturbation, None for a Wasserstein budget (FWA),
    which is not checked here because the attack does not return its transport plan."""

    adv_wrong: torch.Tensor
    in_box: torch.Tensor
    distance: Optional[torch.Tensor]

    def in_ball(self, epsilon: float) -> torch.Tensor:
        if self.distance is None:
            return torch.ones_like(self.in_box)
        return self.distance <= epsilon + BUDGET_TOL

    def broken(self, epsilon: float) -> torch.Tensor:
        """Misclassified, inside [0, 1] and inside ε: the rule of ``robust_mask`` and the evaluation engine."""
        return self.adv_wrong & self.in_box & self.in_ball(epsilon)

    def outside(self, epsilon: float, minimum_norm: bool = False) -> torch.Tensor:
        """Misclassified examples outside the box or the budget (a mask): a bug for attacks with a
        budget. A minimum-norm attack (CW, DDN) may leave the budget; only the box binds it."""
        return self.adv_wrong & ~(self.in_box & (self.in_ball(epsilon) | minimum_norm))


def attack_outcome(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor,
                   attack: Attack) -> Outcome:
    """Classify ``x_adv`` (no gradient) and measure each perturbation."""
    with torch.no_grad():
        adv_wrong = unwrap(model)(x_adv).argmax(dim=1) != y
    in_box = ((x_adv >= -BUDGET_TOL) & (x_adv <= 1 + BUDGET_TOL)).flatten(1).all(dim=1)
    distance = None if attack.budget == "wasserstein" else lp_norm(x_adv - x, attack.norm)
    return Outcome(adv_wrong, in_box, distance)


def robust_mask(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor,
                attack: Union[Attack, str]) -> torch.Tensor:
    """Bool (N,): True where the sample is classified correctly and the attack did not break it.

    An example breaks a sample only if it is misclassified, inside [0, 1] and inside the
    budget (‖x_adv − x‖ ≤ ε + 1e-6; not checked for the Wasserstein budget of FWA, whose
    plan is not returned). That is the paper's rule for CW and DDN, which return examples of
    any norm; for the other attacks an out-of-budget example is a bug, and is warned about.
    A clean mistake is never robust, so robust accuracy cannot exceed clean accuracy."""
    if isinstance(attack, str):
        attack = build_attack(attack)
    net = unwrap(model)
    with attack_mode(net), torch.no_grad():
        clean_right = net(x).argmax(dim=1) == y
        outcome = attack_outcome(net, x, y, x_adv, attack)
    outside = outcome.outside(attack.epsilon, attack.minimum_norm)
    if outside.any():
        warnings.warn(f"{attack.name}: {int(outside.sum())} misclassified example(s) outside [0, 1] or "
                      f"the {attack.budget} budget {attack.epsilon:.4g}; counted as not broken",
                      stacklevel=2)
    return clean_right & ~outcome.broken(attack.epsilon)
