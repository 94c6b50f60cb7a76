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

Resuming (``resume_from``): the package's own ``state_path`` cannot resume in pyautoattack 0.2.0
(its state file stores the set of attacks as the text of a Python set, so every restore fails the
"same attacks" check, and its restore branch leaves ``y_adv`` unbound). With a state file, the
package's ``run_standard_evaluation`` is called once per sub-attack instead, on the examples still
robust, in order: the batches, seeds and so the results are those of one call, and after each
sub-attack the robust flags (EvaluationState's fields) and the adversarial rows found so far are
written atomically, so a resumed batch never repeats a finished sub-attack.
"""
import contextlib
import contextvars
import inspect
from pathlib import Path
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


_STATE_PATH: contextvars.ContextVar = contextvars.ContextVar("autoattack_state_path", default=None)


@contextlib.contextmanager
def resume_from(path):
    """AutoAttack calls inside keep their progress in the state file ``path`` and resume from it."""
    token = _STATE_PATH.set(Path(path))
    try:
        yield
    finally:
        _STATE_PATH.reset(token)


class StateMismatch(ValueError):
    """A state file written for other examples or another AutoAttack configuration."""


def _settings(adversary) -> dict:
    """What a state file must match: the configuration, and a fingerprint of the model's weights."""
    weights = [p.detach().double().sum() for p in adversary.model.parameters()]
    return {"attacks_to_run": list(adversary.attacks_to_run), "version": adversary.version, "norm": adversary.norm,
            "eps": float(adversary.epsilon), "seed": adversary.seed, "n_iter": int(adversary.apgd.n_iter),
            "n_queries": int(adversary.square.n_queries),
            "weights": float(torch.stack(weights).sum()) if weights else 0.0}


def _load_state(path: Path, adversary, y: torch.Tensor) -> Optional[dict]:
    from utils.script import UserError
    from utils.training.checkpoint import load_checkpoint

    if not path.is_file():
        return None
    try:
        state = load_checkpoint(path, "--aa-state")
    except UserError as err:
        raise StateMismatch(str(err)) from None
    if state.get("settings") != _settings(adversary) or not torch.equal(state.get("labels"), y.cpu()):
        raise StateMismatch(f"{path} holds the AutoAttack state of other examples or settings "
                            f"({state.get('settings')}); remove it or use another folder")
    return state


def _resumable(adversary, x: torch.Tensor, y: torch.Tensor, batch_size: int, path: Path) -> torch.Tensor:
    """``run_standard_evaluation`` one sub-attack at a time, its progress kept in ``path`` (module docstring)."""
    from utils.training.checkpoint import atomic_save

    state = _load_state(path, adversary, y)
    x_adv = x.clone()
    if state is None:
        with torch.no_grad():  # the package's own clean pass, and its robust flags
            preds = torch.cat([adversary.get_logits(part).max(dim=1)[1] for part in x.split(batch_size)])
        flags = preds == y
        state = {"settings": _settings(adversary), "labels": y.cpu(), "run_attacks": [], "clean_flags": flags.cpu(),
                 "robust_flags": flags.cpu().clone(), "clean_accuracy": float(flags.float().mean()),
                 "adv_index": torch.zeros(0, dtype=torch.long), "adv": x.new_zeros((0, *x.shape[1:])).cpu()}
        atomic_save(state, path)
    flags = state["robust_flags"].to(x.device, copy=True)  # updated in place below; the state keeps its own
    x_adv[state["adv_index"].to(x.device)] = state["adv"].to(x_adv)
    attacks = list(adversary.attacks_to_run)
    try:
        for attack in attacks:
            if attack in state["run_attacks"]:
                continue
            robust = flags.nonzero().flatten()  # once per sub-attack, as the package does
            if robust.numel():
                adversary.attacks_to_run = [attack]
                adv, y_adv = adversary.run_standard_evaluation(x[robust], y[robust], batch_size=batch_size)
                broken = robust[y_adv != y[robust]]
                x_adv[broken] = adv[y_adv != y[robust]]
                flags[broken] = False
            index = (state["clean_flags"] & ~flags.cpu()).nonzero().flatten()  # broken so far
            state.update(run_attacks=[*state["run_attacks"], attack], robust_flags=flags.cpu().clone(),
                         adv_index=index, adv=x_adv[index.to(x.device)].cpu())
            atomic_save(state, path)
    finally:
        adversary.attacks_to_run = attacks
    return x_adv


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
        if _STATE_PATH.get() is not None:
            return _resumable(adversary, x, y, batch_size, _STATE_PATH.get()).detach()
        result = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    # 0.2 returns (x_adv, y_adv); older releases returned x_adv alone.
    x_adv = result[0] if isinstance(result, tuple) else result
    return x_adv.detach()
