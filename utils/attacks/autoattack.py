"""AutoAttack (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble
of diverse parameter-free attacks", ICML 2020), called through the official code in the
``pyautoattack`` package: this module only builds the object and sets its budgets.

Versions:
- ``"standard"``, ``"plus"``, ``"rand"``: the package's own settings (standard = APGD-CE,
  APGD-T, FAB-T, Square; 100 iterations, 5000 Square queries). The paper's "AA".
- ``"release"``: the release's "AA": the standard attacks with 40 iterations each for
  APGD-CE, APGD-T and FAB-T. Square counts queries, not iterations, and keeps its 5000
  unless ``n_queries`` says otherwise.
- ``"custom"``: the attacks named in ``attacks_to_run`` with the package's per-attack
  defaults (APGD and FAB: 5 restarts).
"""
import inspect
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .base import attack_mode, canonical_norm, unwrap

VERSIONS = ("standard", "plus", "rand", "custom", "release")
RELEASE_ITERATIONS = 40
_NORM_NAMES = {"linf": "Linf", "l2": "L2"}


def set_iterations(adversary, n_iter: int) -> None:
    """Give APGD, APGD-T and FAB ``n_iter`` iterations after construction.

    APGD derives its step-size checkpoints from ``n_iter`` when it is built; they are set
    here exactly as its constructor would have set them."""
    for apgd in (adversary.apgd, adversary.apgd_targeted):
        apgd.n_iter = n_iter
        apgd.n_iter_orig = n_iter
        apgd.n_iter_2 = max(int(0.22 * n_iter), 1)
        apgd.n_iter_min = max(int(0.06 * n_iter), 1)
        apgd.size_decr = max(int(0.03 * n_iter), 1)
    adversary.fab.n_iter = n_iter


def build_autoattack(
    model: nn.Module,
    epsilon: float,
    norm: str = "linf",
    version: str = "standard",
    seed: int = 0,
    n_iter: Optional[int] = None,
    n_queries: Optional[int] = None,
    verbose: bool = False,
    attacks_to_run: Optional[Sequence[str]] = None,
    device=None,
):
    """The configured ``pyautoattack.AutoAttack`` object (see the module docstring)."""
    from pyautoattack import AutoAttack

    norm = canonical_norm(norm)
    if version not in VERSIONS:
        raise ValueError(f"unknown AutoAttack version {version!r}; expected one of {VERSIONS}")
    if version == "custom" and not attacks_to_run:
        raise ValueError("version 'custom' needs attacks_to_run, e.g. ['apgd-ce', 'apgd-t']")
    if version != "custom" and attacks_to_run is not None:
        raise ValueError(f"attacks_to_run is only read with version 'custom', not {version!r}")
    # The package renamed its keyword; pass the list under whichever name it takes.
    params = inspect.signature(AutoAttack.__init__).parameters
    attacks_kw = "attacks" if "attacks" in params else "attacks_to_run"
    adversary = AutoAttack(
        model,
        **{attacks_kw: list(attacks_to_run) if attacks_to_run is not None else None},
        device=device,
        eps=epsilon,
        norm=_NORM_NAMES[norm],
        seed=seed,
        version="standard" if version == "release" else version,
    )
    adversary.verbose = verbose
    if version == "release" and n_iter is None:
        n_iter = RELEASE_ITERATIONS
    if n_iter is not None:
        set_iterations(adversary, n_iter)
    if n_queries is not None:
        adversary.square.n_queries = n_queries
    return adversary


class _Float32Logits(nn.Module):
    """Under bf16 autocast AutoAttack would compute its CE/DLR losses, FAB's linearisation and
    Square's margins on bf16 logits: hand it fp32 ones, as the project's own attacks use."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).float()


def autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epsilon: float,
    norm: str = "linf",
    version: str = "standard",
    seed: int = 0,
    n_iter: Optional[int] = None,
    batch_size: int = 500,
    verbose: bool = False,
    attacks_to_run: Optional[Sequence[str]] = None,
    n_queries: Optional[int] = None,
) -> torch.Tensor:
    """AutoAttack's adversarial examples for (x, y); robust points come back unchanged.

    ``n_iter`` overrides the iterations of APGD, APGD-T and FAB for any version. The result
    is what a direct ``AutoAttack(...).run_standard_evaluation`` on the model in eval mode
    gives: each sub-attack reseeds the global RNG with ``seed`` (and so changes its state)."""
    x = x.detach()
    net = unwrap(model)
    with attack_mode(net):
        adversary = build_autoattack(_Float32Logits(net).eval(), epsilon, norm, version, seed, n_iter, n_queries,
                                     verbose, attacks_to_run, device=x.device)
        result = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    # 0.2 returns (x_adv, y_adv); older releases returned x_adv alone.
    x_adv = result[0] if isinstance(result, tuple) else result
    return x_adv.detach()
