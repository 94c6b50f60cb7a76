"""The evaluation engine behind test_comparison.py (PAPER.md §7).

Every attack runs over the same examples, in the same batches; each model's clean
predictions are computed once and reused. Results are per-example robust masks (bool
tensors), so the worst case over attacks is one AND. Trust checks in the spirit of
AutoAttack's ``checks.py`` look for signs that an evaluation cannot be trusted (randomness,
zero gradients, probabilities instead of logits, a model left in train mode, robust above
clean, PGD below AutoAttack, accuracy that rises with ε). Reports go out as Markdown, JSON
and an accuracy-against-ε plot."""
import dataclasses
import logging
import math
import re
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from utils.attacks.base import attack_mode, lp_norm, unwrap
from utils.attacks.registry import BUDGET_TOL, Attack
from utils.data import BatchLoader
from utils.device import seed_everything
from utils.plots import pyplot, save_figure
from utils.splits import Split

# Above this fraction of zero input gradients in a batch, gradient attacks are blind there.
# (AutoAttack warns on any; a few saturated softmaxes in a confident model are not masking.)
ZERO_GRADIENT_FRACTION = 0.1
# AutoAttack's tolerance on L2-normalised logits for two passes of the same input.
RANDOMNESS_TOL = 1e-4
# AutoAttack's tolerance for "the outputs sum to one".
PROBABILITY_TOL = 1e-5


# ---------------------------------------------------------------- warnings


class Report:
    """Trust warnings: printed on stderr as they arise (AutoAttack's style), kept for the JSON."""

    def __init__(self, echo: bool = True):
        self.messages: List[str] = []
        self.echo = echo

    def warn(self, message: str) -> None:
        if message in self.messages:
            return
        self.messages.append(message)
        if self.echo:
            # tqdm.write keeps an open progress bar intact.
            tqdm.write(f"Warning: {message}", file=sys.stderr)


class _Forward(logging.Handler):
    def __init__(self, report: Report, prefix: str):
        super().__init__(level=logging.WARNING)
        self.report, self.prefix = report, prefix

    def emit(self, record):
        self.report.warn(f"{self.prefix}{record.getMessage()}")


@contextmanager
def forward_warnings(report: Report, prefix: str):
    """Route Python warnings and AutoAttack's logged warnings raised inside into ``report``."""
    logger = logging.getLogger("auto-attack")
    handler = _Forward(report, prefix)
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        logger.removeHandler(handler)
    for w in caught:
        if not issubclass(w.category, (DeprecationWarning, FutureWarning)):
            report.warn(f"{prefix}{w.message}")


# ---------------------------------------------------------------- per-example outcomes


def first_examples(split: Split, n: Optional[int]) -> Split:
    """The first ``n`` examples in order (all of them for None); never a random subset."""
    if n is None or n == len(split):
        return split
    return split.subset(torch.arange(n))


@dataclass
class Outcome:
    """What an adversarial batch did to one model, per example (CPU tensors).

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
        """The registry's rule (``robust_mask``): misclassified, inside [0, 1] and inside ε."""
        return self.adv_wrong & self.in_box & self.in_ball(epsilon)

    def outside(self, epsilon: float) -> int:
        """Misclassified examples outside the box or budget: a bug for non-minimum-norm attacks."""
        return int((self.adv_wrong & ~(self.in_box & self.in_ball(epsilon))).sum())


def attack_outcome(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor,
                   attack: Attack) -> Outcome:
    """Classify ``x_adv`` (no gradient) and measure each perturbation."""
    with torch.no_grad():
        adv_wrong = unwrap(model)(x_adv).argmax(dim=1) != y
    in_box = ((x_adv >= -BUDGET_TOL) & (x_adv <= 1 + BUDGET_TOL)).flatten(1).all(dim=1)
    distance = None if attack.budget == "wasserstein" else lp_norm(x_adv - x, attack.norm)
    return Outcome(adv_wrong.cpu(), in_box.cpu(), None if distance is None else distance.cpu())


def accuracy(mask: torch.Tensor) -> float:
    """Percentage of True entries (0 for an empty mask)."""
    # From the integer count: a float32 mean would report 113/200 as 56.49999976158142.
    return 100.0 * int(mask.sum()) / mask.numel() if mask.numel() else 0.0


@dataclass
class ModelResult:
    """One model's per-example masks (True = correct / still robust) and wall times (s)."""

    name: str
    clean: torch.Tensor
    robust: Dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)
    sweep: Dict[str, Dict[float, torch.Tensor]] = field(default_factory=dict)
    sweep_seconds: Dict[str, Dict[float, float]] = field(default_factory=dict)

    @property
    def worst(self) -> torch.Tensor:
        """Robust to every attack run (the clean mask when none was)."""
        mask = self.clean.clone()
        for robust in self.robust.values():
            mask &= robust
        return mask

    def table_row(self) -> Dict[str, float]:
        """Accuracies (%): clean, each attack, worst case."""
        row = {"clean": accuracy(self.clean)}
        row.update({name: accuracy(mask) for name, mask in self.robust.items()})
        row["worst case"] = accuracy(self.worst)
        return row


# ---------------------------------------------------------------- trust checks


def check_randomness(model: nn.Module, x: torch.Tensor) -> Optional[str]:
    """Two eval-mode passes of one batch must agree (AutoAttack's ``check_randomized``)."""
    with torch.no_grad():
        a, b = model(x).float(), model(x).float()
    a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
    b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
    diff = float((a - b).norm(dim=1).max())
    if diff > RANDOMNESS_TOL or not torch.equal(a.argmax(1), b.argmax(1)):
        return (f"two forward passes of the same input in eval mode disagree (normalised logits differ by "
                f"{diff:.2g}): it seems to be a randomized defense (dropout or noise left on at test time?); "
                "gradient attacks on it are unreliable, consider --aa-version rand")
    return None


def check_output_range(model: nn.Module, x: torch.Tensor) -> Optional[str]:
    """Outputs that look like probabilities (AutoAttack's ``check_range_output``)."""
    with torch.no_grad():
        out = model(x).float()
    if out.max() < 1 + PROBABILITY_TOL and out.min() > -PROBABILITY_TOL and \
            bool(((out.sum(dim=1) - 1).abs() < PROBABILITY_TOL).all()):
        return ("the outputs look like a probability distribution; attacks expect logits, "
                "a softmax at the end weakens cross-entropy attacks")
    return None


def zero_gradient_fraction(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of inputs whose cross-entropy gradient with respect to the input is exactly 0."""
    net = unwrap(model)
    with attack_mode(net), torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(net(x).float(), y, reduction="sum")
        if not loss.requires_grad:  # the output does not depend on the input at all
            return 1.0
        (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    if grad is None:
        return 1.0
    return float((grad.flatten(1).abs().sum(dim=1) == 0).float().mean())


def check_zero_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Optional[str]:
    fraction = zero_gradient_fraction(model, x, y)
    if fraction > ZERO_GRADIENT_FRACTION:
        return (f"{fraction:.0%} of {x.shape[0]} inputs have an all-zero input gradient (more than "
                f"{ZERO_GRADIENT_FRACTION:.0%}): gradient masking, gradient-based attacks are unreliable")
    return None


def check_eval_mode(model: nn.Module) -> Optional[str]:
    """Modules left in train mode (dropout on, BatchNorm statistics updated by the evaluation)."""
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        shown = ", ".join(training[:3]) + (" ..." if len(training) > 3 else "")
        return f"{len(training)} module(s) in train mode ({shown}); put back in eval mode"
    return None


def check_results(results: Sequence[ModelResult], attacks: Sequence[Attack], transfer: bool = False) -> List[str]:
    """Robust above clean (a bug), and PGD below AutoAttack at the same budget (suspicious)."""
    messages = []
    aa = [a for a in attacks if a.name == "aa"]
    for r in results:
        row = r.table_row()
        for name, acc in row.items():
            if name != "clean" and acc > row["clean"]:
                messages.append(f"{r.name}: {name} accuracy {acc:.2f}% is above the clean accuracy "
                                f"{row['clean']:.2f}%: a bug in the evaluation")
        if transfer:
            continue  # transferred AA is not meant to be stronger than transferred PGD
        for a in aa:
            for p in attacks:
                if re.fullmatch(r"(l2-)?pgd\d+", p.name) and p.norm == a.norm and \
                        math.isclose(p.epsilon, a.epsilon) and p.name in row and a.name in row and \
                        row[p.name] < row[a.name]:
                    messages.append(f"{r.name}: {p.name} accuracy {row[p.name]:.2f}% is below AutoAttack's "
                                    f"{row[a.name]:.2f}%: AutoAttack should be the stronger attack, "
                                    "its run may be misconfigured")
    return messages


def check_sweep(results: Sequence[ModelResult]) -> List[str]:
    """Robust accuracy must not rise as ε grows, and should fall somewhere along the sweep."""
    messages = []
    for r in results:
        for name, by_eps in r.sweep.items():
            eps = sorted(by_eps)
            accs = [accuracy(by_eps[e]) for e in eps]
            for (e0, a0), (e1, a1) in zip(zip(eps, accs), zip(eps[1:], accs[1:])):
                if a1 > a0:
                    messages.append(f"{r.name}: {name} accuracy rises from {a0:.2f}% at ε={e0:.4g} to {a1:.2f}% "
                                    f"at ε={e1:.4g}; a larger budget cannot help the model: the attack is unreliable")
            positive = [(e, a) for e, a in zip(eps, accs) if e > 0]
            if len(positive) >= 2 and positive[0][1] > 0 and positive[-1][1] >= positive[0][1]:
                messages.append(f"{r.name}: {name} accuracy does not fall from ε={positive[0][0]:.4g} to "
                                f"ε={positive[-1][0]:.4g} ({positive[-1][1]:.2f}%): gradient masking or a "
                                "broken attack, unless all these budgets are tiny")
    return messages


# ---------------------------------------------------------------- the engine


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Evaluation:
    """Run attacks over the first-N examples of ``split`` against ``targets`` (name → model).

    White-box: each target is attacked through its own gradients. Transfer (``surrogate``
    given): each attack is crafted once on the surrogate and the same examples are fed to
    every target; targets then only ever run under ``torch.no_grad()``."""

    def __init__(self, targets: Dict[str, nn.Module], split: Split, *, batch_size: int, device,
                 surrogate: Optional[nn.Module] = None, seed: int = 0, progress: bool = True,
                 report: Optional[Report] = None):
        self.targets = targets
        self.split = split
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.surrogate = surrogate
        self.seed = seed
        self.progress = progress
        self.report = report if report is not None else Report()
        self.results: Dict[str, ModelResult] = {}

    @property
    def transfer(self) -> bool:
        return self.surrogate is not None

    def _batches(self, desc: Optional[str]) -> Iterator[Tuple[torch.Tensor, torch.Tensor, slice]]:
        """(x, y, where in the split) per batch, in order; a progress bar unless ``desc`` is None."""
        loader = BatchLoader(self.split, self.batch_size, device=self.device)
        start = 0
        bar = desc is not None and self.progress
        for x, y in tqdm(loader, desc=desc, leave=False, disable=not bar, dynamic_ncols=True):
            yield x, y, slice(start, start + y.shape[0])
            start += y.shape[0]

    def _sources(self) -> List[Tuple[str, nn.Module, List[str]]]:
        """(label, model whose gradients craft the examples, targets that are evaluated on them)."""
        if self.transfer:
            return [("surrogate", self.surrogate, list(self.targets))]
        return [(name, model, [name]) for name, model in self.targets.items()]

    def prepare(self) -> Dict[str, ModelResult]:
        """Eval mode, trust checks on the first batch, and each target's clean mask (once)."""
        for model in [*self.targets.values(), *([self.surrogate] if self.transfer else [])]:
            model.eval()
        x0, y0, _ = next(self._batches(None))
        for name, model in self.targets.items():
            for message in (check_randomness(model, x0), check_output_range(model, x0)):
                if message:
                    self.report.warn(f"{name}: {message}")
        for label, source, _ in self._sources():
            message = check_zero_gradients(source, x0, y0)
            if message:
                self.report.warn(f"{label}: {message}")
        for name, model in self.targets.items():
            began = time.perf_counter()
            parts = []
            for x, y, _ in self._batches(f"{name}: clean"):
                with torch.no_grad():
                    parts.append((model(x).argmax(dim=1) == y).cpu())
            _sync(self.device)
            self.results[name] = ModelResult(name, torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool))
            self.results[name].seconds["clean"] = time.perf_counter() - began
        return self.results

    def _attack(self, source: nn.Module, names: List[str], attack: Attack, epsilons: Sequence[float],
                desc: str) -> Tuple[Dict[str, Dict[float, torch.Tensor]], Dict[str, float]]:
        """Masks per target and ε for one run of ``attack`` (several ε only for a minimum-norm attack)."""
        seed_everything(self.seed)  # every attack sees the same random stream, whatever ran before it
        masks = {n: {e: [] for e in epsilons} for n in names}
        outside = {n: 0 for n in names}
        craft, own = 0.0, {n: 0.0 for n in names}
        with forward_warnings(self.report, f"{attack.name} ({desc}): "):
            for x, y, part in self._batches(f"{desc}: {attack.name}"):
                # White-box: an example the target already misclassifies counts as broken whatever the
                # attack does, so only the correct ones are attacked (AutoAttack does the same).
                keep = None if self.transfer else self.results[names[0]].clean[part]
                if keep is not None and not keep.all():
                    on = keep.to(x.device)
                    x, y = x[on], y[on]
                began = time.perf_counter()
                x_adv = attack(source, x, y) if len(y) else x
                _sync(self.device)
                craft += time.perf_counter() - began
                for n in names:
                    began = time.perf_counter()
                    outcome = attack_outcome(self.targets[n], x, y, x_adv, attack)
                    clean = self.results[n].clean[part]
                    for e in epsilons:
                        robust = ~outcome.broken(e)
                        if keep is not None:
                            robust = torch.zeros_like(keep).masked_scatter(keep, robust)
                        masks[n][e].append(clean & robust)
                    if not attack.minimum_norm:
                        outside[n] += outcome.outside(attack.epsilon)
                    own[n] += time.perf_counter() - began
        for n in names:
            if outside[n]:
                self.report.warn(f"{n}: {attack.name}: {outside[n]} misclassified example(s) outside [0, 1] or "
                                 f"the {attack.budget} budget {attack.epsilon:.4g}; counted as not broken")
        for label, model in [(desc, source), *[(n, self.targets[n]) for n in names]]:
            message = check_eval_mode(model)
            if message:
                self.report.warn(f"{label}: after {attack.name}: {message}")
                model.eval()
        joined = {n: {e: torch.cat(m) if m else torch.zeros(0, dtype=torch.bool) for e, m in by_eps.items()}
                  for n, by_eps in masks.items()}
        # A transferred attack's crafting is shared: each target is charged all of it plus its own evaluation.
        return joined, {n: craft + own[n] for n in names}

    def run(self, attacks: Sequence[Attack], sweep_attacks: Sequence[Attack] = (),
            epsilons: Sequence[float] = ()) -> Dict[str, ModelResult]:
        """Table attacks, then the ε sweep; returns ``{target name: ModelResult}``."""
        if not self.results:
            self.prepare()
        epsilons = sorted(set(float(e) for e in epsilons))
        for label, source, names in self._sources():
            for attack in attacks:
                masks, seconds = self._attack(source, names, attack, [attack.epsilon], label)
                for n in names:
                    self.results[n].robust[attack.name] = masks[n][attack.epsilon]
                    self.results[n].seconds[attack.name] = seconds[n]
            for attack in sweep_attacks:
                self._sweep(label, source, names, attack, epsilons, attacks)
        return self.results

    def _sweep(self, label: str, source: nn.Module, names: List[str], attack: Attack,
               epsilons: Sequence[float], table_attacks: Sequence[Attack]) -> None:
        for n in names:
            self.results[n].sweep[attack.name] = {}
            self.results[n].sweep_seconds[attack.name] = {}

        def store(e: float, masks, seconds) -> None:
            for n in names:
                self.results[n].sweep[attack.name][e] = masks[n]
                self.results[n].sweep_seconds[attack.name][e] = seconds[n] if seconds else 0.0

        todo = []
        for e in epsilons:
            same = [a for a in table_attacks if a.name == attack.name and math.isclose(a.epsilon, e)]
            if e == 0:
                # No budget, nothing to attack: robust means correct.
                store(e, {n: self.results[n].clean.clone() for n in names}, None)
            elif same:
                store(e, {n: self.results[n].robust[attack.name] for n in names},
                      {n: self.results[n].seconds[attack.name] for n in names})
            else:
                todo.append(e)
        if not todo:
            return
        if attack.epsilon_free:
            # One run gives every budget: the attack ignores ε, only the counting uses it.
            masks, seconds = self._attack(source, names, attack, todo, label)
            for e in todo:
                store(e, {n: masks[n][e] for n in names}, seconds)
            return
        for e in todo:
            masks, seconds = self._attack(source, names, dataclasses.replace(attack, epsilon=e), [e], label)
            store(e, {n: masks[n][e] for n in names}, seconds)

    def trust_checks(self, attacks: Sequence[Attack]) -> None:
        for message in check_results(list(self.results.values()), attacks, self.transfer) + \
                check_sweep(list(self.results.values())):
            self.report.warn(message)


# ---------------------------------------------------------------- reports


def examples_text(n: str, test_limits: Sequence[Optional[int]]) -> str:
    """Which test images were evaluated: with --test-limit, the first N of a seeded subset."""
    limits = sorted({limit for limit in test_limits if limit})
    if limits:
        return f"first {n} of a seeded subset of {'/'.join(map(str, limits))} test images (--test-limit)"
    return f"first {n} test images"


def format_epsilon(epsilon: float, norm: str) -> str:
    """``8/255`` for L∞ budgets on the 1/255 grid, a short decimal otherwise; a budget that is a
    short decimal already (0.2, which is also 51/255) keeps that spelling."""
    short = f"{epsilon:.4g}"
    on_grid = abs(epsilon * 255 - round(epsilon * 255)) < 1e-6
    if norm == "linf" and epsilon > 0 and on_grid and float(f"{epsilon:.3g}") != epsilon:
        return f"{round(epsilon * 255)}/255"
    return short


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def markdown_table(results: Sequence[ModelResult], attack_names: Sequence[str]) -> str:
    """One row per model: clean, each attack, worst case; accuracy in % with 2 decimals."""
    header = ["model", "clean", *attack_names, "worst case"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in results:
        row = r.table_row()
        cells = [_cell(r.name)] + [f"{row[k]:.2f}" for k in header[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_table(results: Sequence[ModelResult], attacks: Sequence[Attack]) -> str:
    """One row per (model, attack), one column per ε."""
    epsilons = sorted({e for r in results for by_eps in r.sweep.values() for e in by_eps})
    norm = attacks[0].norm if attacks else "linf"
    header = ["model", "attack", *[f"ε={format_epsilon(e, norm) if e else '0'}" for e in epsilons]]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---"] + ["---:"] * len(epsilons)) + "|"]
    for r in results:
        for a in attacks:
            by_eps = r.sweep.get(a.name, {})
            cells = [f"{accuracy(by_eps[e]):.2f}" if e in by_eps else "" for e in epsilons]
            lines.append("| " + " | ".join([_cell(r.name), a.name, *cells]) + " |")
    return "\n".join(lines)


def plot_sweep(results: Sequence[ModelResult], attacks: Sequence[Attack], path, title: str = "") -> Path:
    """Accuracy (%) against ε, one panel per attack, one line per model; written as PNG."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.5 * len(attacks), 3.6), squeeze=False)
    for ax, a in zip(axes[0], attacks):
        scale = 255.0 if a.norm == "linf" else 1.0
        for r in results:
            by_eps = r.sweep.get(a.name, {})
            eps = sorted(by_eps)
            ax.plot([e * scale for e in eps], [accuracy(by_eps[e]) for e in eps], marker="o", label=r.name)
        ax.set_xlabel("ε (×1/255)" if a.norm == "linf" else f"ε ({a.norm})")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(a.name)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def attack_settings(attacks: Sequence[Attack]) -> Dict[str, dict]:
    return {a.name: {"norm": a.norm, "epsilon": a.epsilon, "budget": a.budget, "minimum_norm": a.minimum_norm}
            for a in attacks}


def results_json(results: Sequence[ModelResult], attacks: Sequence[Attack], model_info: Dict[str, dict],
                 sweep_attacks: Sequence[Attack] = ()) -> dict:
    """The numbers of the tables (full precision), counts and wall times, per model."""
    models = []
    for r in results:
        row = r.table_row()
        entry = {
            **model_info.get(r.name, {}), "name": r.name, "n": int(r.clean.numel()),
            "clean": row["clean"], "attacks": {a.name: row[a.name] for a in attacks}, "worst_case": row["worst case"],
            "correct": {"clean": int(r.clean.sum()), **{k: int(m.sum()) for k, m in r.robust.items()},
                        "worst_case": int(r.worst.sum())},
            "seconds": dict(r.seconds),
        }
        if sweep_attacks:
            entry["eps_sweep"] = {a.name: {"epsilon": sorted(r.sweep.get(a.name, {})),
                                           "accuracy": [accuracy(r.sweep[a.name][e])
                                                        for e in sorted(r.sweep.get(a.name, {}))],
                                           "seconds": [r.sweep_seconds[a.name][e]
                                                       for e in sorted(r.sweep.get(a.name, {}))]}
                                  for a in sweep_attacks}
        models.append(entry)
    return {"models": models}

