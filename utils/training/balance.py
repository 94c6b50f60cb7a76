"""Stage 3's gradient balance (PAPER.md §10): how ∇θ α·L_mi compares with ∇θ L_adv on the
training step's own graph, an optional cap of the MI gradient, and the collapse guard.

At the paper's α = 5 a small network's MI gradient can be several times the adversarial one,
and such runs fell to chance within an epoch. The cap is MINE's adaptive gradient clipping
(Belghazi et al., 2018, §3.2): the MI gradient is scaled to at most ρ·‖∇θ L_adv‖."""
import math
import sys
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn

from utils.script import Collapsed
from utils.training import distributed

Tensor = torch.Tensor

# The warning line, on the median ratio of an epoch. On the committed Fashion-MNIST SmallCNN
# runs (results/fashion-mnist/alpha), every run that fell to chance had a first-batch ratio of
# 0.72 or more; every run that trained stayed at 0.67 or less, and those above 0.5 trained
# worse than Standard AT.
BALANCE_LIMIT = 0.5
# Clean accuracy at most this multiple of chance (100 / classes) counts as a collapse.
CHANCE_FACTOR = 1.5


def parameter_gradients(loss: Tensor, params: Sequence[Tensor], retain_graph: bool) -> List[Tensor]:
    """∇ loss for each of ``params``; zeros where the loss does not reach a parameter."""
    if not loss.requires_grad:
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _dot(a: List[Tensor], b: List[Tensor]) -> Tensor:
    return torch.stack([(x.double() * y.double()).sum() for x, y in zip(a, b)]).sum()


def grad_balance(model: nn.Module, l_adv: Tensor, weighted_mi: Tensor,
                 clip: Optional[float] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The loss to backpropagate for L_adv + α·L_mi, and the balance of its two gradients.

    Two gradient computations over the model's trainable parameters, on the graph of the step
    (no forward pass is added, no ``.grad`` is touched). Scalars: ``grad_adv`` = ‖∇θ L_adv‖,
    ``grad_mi`` = ‖∇θ α·L_mi‖, their ``grad_ratio`` and cosine ``grad_cos``. A term that does
    not depend on θ (an empty W) has gradient 0.

    ``clip`` None: the loss is L_adv + α·L_mi, its graph kept for the step's backward.
    ``clip`` ρ: s = min(1, ρ·‖∇θ L_adv‖ / ‖∇θ α·L_mi‖); the loss has the value L_adv + s·α·L_mi
    and the gradient ∇θ L_adv + s·∇θ α·L_mi, built from the two gradients already computed, so
    the step needs no third backward pass. Adds ``mi_scale`` = s and ``grad_ratio_applied``,
    the ratio that reaches the optimizer (at most ρ)."""
    params = [p for p in model.parameters() if p.requires_grad]
    g_adv = parameter_gradients(l_adv, params, retain_graph=True)
    g_mi = parameter_gradients(weighted_mi, params, retain_graph=clip is None)
    n_adv, n_mi = _dot(g_adv, g_adv).sqrt(), _dot(g_mi, g_mi).sqrt()
    tiny = torch.finfo(torch.float64).tiny
    ratio = n_mi / n_adv.clamp_min(tiny)
    scalars = {"grad_adv": n_adv, "grad_mi": n_mi, "grad_ratio": ratio,
               "grad_cos": _dot(g_adv, g_mi) / (n_adv * n_mi).clamp_min(tiny)}
    if clip is None:
        return l_adv + weighted_mi, scalars
    scale = (clip * n_adv / n_mi.clamp_min(tiny)).clamp(max=1.0)
    scalars.update(mi_scale=scale, grad_ratio_applied=ratio * scale)
    s = scale.to(l_adv.dtype)
    # Σ p·g has gradient g and, minus its own detached value, the value 0.
    surrogate = sum((p * (ga + s * gm).detach()).sum() for p, ga, gm in zip(params, g_adv, g_mi))
    value = (l_adv + s * weighted_mi).detach()
    return value + (surrogate - surrogate.detach()), scalars


class BalanceLog:
    """The balance of the measured batches of one epoch, kept on the device and read once at
    the epoch's end. Batches with an empty W (no MI gradient to measure) are left out."""

    KEYS = ("grad_adv", "grad_mi", "grad_ratio", "grad_cos", "grad_ratio_applied", "mi_scale")

    def __init__(self):
        self.rows: List[Tensor] = []

    def add(self, scalars: Dict[str, Tensor], w_size: Tensor) -> None:
        ratio = scalars["grad_ratio"]
        defaults = {"grad_ratio_applied": ratio, "mi_scale": torch.ones_like(ratio)}  # no cap: nothing scaled
        values = [scalars.get(k, defaults.get(k)) for k in self.KEYS]
        self.rows.append(torch.stack([v.detach().double().reshape(()) for v in [*values, w_size]]))

    def summary(self) -> Dict[str, Optional[float]]:
        """Medians (and the ratio's maximum) over the measured batches with a non-empty W, and
        how many there were; None where there were none."""
        width = len(self.KEYS) + 1
        table = torch.stack(self.rows).cpu() if self.rows else torch.zeros((0, width), dtype=torch.float64)
        kept = table[table[:, -1] > 0]
        out: Dict[str, Optional[float]] = {"balance_batches": int(kept.shape[0])}
        for i, key in enumerate(self.KEYS):
            column = kept[:, i]
            out[key] = float(column.median()) if len(column) else None
        out["grad_ratio_max"] = float(kept[:, 2].max()) if len(kept) else None
        out["grad_ratio_applied_max"] = float(kept[:, 4].max()) if len(kept) else None
        return out


def measured_batches(num_batches: int, count: int) -> List[int]:
    """Indices of the ``count`` batches of an epoch to measure, spread evenly over it."""
    if count <= 0 or num_batches <= 0:
        return []
    count = min(count, num_batches)
    return sorted({math.floor(i * num_batches / count) for i in range(count)})


def unbalanced(summary: Dict[str, Optional[float]], limit: float) -> bool:
    ratio = summary.get("grad_ratio_applied")
    return ratio is not None and ratio > limit


def describe(summary: Dict[str, Optional[float]]) -> str:
    """The measured balance in a few words, for the warning and the collapse guard."""
    if not summary.get("balance_batches"):
        return "no batch with a non-empty W was measured"
    text = (f"‖∇θ α·L_mi‖ / ‖∇θ L_adv‖ median {summary['grad_ratio']:.3g}, max {summary['grad_ratio_max']:.3g} "
            f"over {summary['balance_batches']} batches")
    if summary.get("mi_scale") is not None and summary["mi_scale"] < 1:
        text += f" (capped to {summary['grad_ratio_applied']:.3g})"
    return text


def collapsed(clean_acc: float, num_classes: int) -> bool:
    """The held-out clean accuracy is at chance: at most ``CHANCE_FACTOR`` × 100 / classes."""
    return clean_acc <= CHANCE_FACTOR * 100.0 / num_classes


class BalanceMonitor:
    """Stage 3's per-epoch balance: which batches to measure, their log, the warning and the
    collapse guard.

    ``batches`` batches spread over each epoch are measured (every batch when ``clip`` is set,
    whose cap needs the two gradients anyway). At the epoch's end their summary joins the
    metrics, one warning line is printed when the median applied ratio exceeds ``limit``, and
    with ``guard`` a non-finite loss or, in an adversarial epoch, a held-out clean accuracy that
    falls to chance stops the run (``Collapsed``) before the epoch is saved."""

    def __init__(self, batches: int, limit: float, clip: Optional[float], guard: bool, num_classes: int,
                 advice: str):
        self.batches, self.limit, self.clip, self.guard = batches, limit, clip, guard
        self.num_classes, self.advice = num_classes, advice
        self.log = BalanceLog()
        self.schedule: Set[int] = set()
        self.step = 0
        self.summary: Dict[str, Optional[float]] = {}
        self.above_chance = False

    def start_epoch(self, num_batches: int) -> None:
        self.log = BalanceLog()
        every = range(num_batches) if self.clip is not None else measured_batches(num_batches, self.batches)
        self.schedule = set(every)
        self.step = 0

    def measure_next(self) -> bool:
        """Whether the step about to run is measured (call once per step)."""
        measured = self.step in self.schedule
        self.step += 1
        return measured

    def record(self, extra: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Take the balance scalars out of a measured step's ``extra`` into the log; the rest is returned."""
        scalars = {k: extra.pop(k) for k in BalanceLog.KEYS if k in extra}
        w_size = extra.get("w_size", torch.ones_like(scalars["grad_ratio"]))  # WMIM has no W: every batch counts
        self.log.add(scalars, w_size)
        return extra

    def end_training(self, epoch: int, stats: Dict[str, object]) -> None:
        """The summary into ``stats``; the warning; a non-finite loss stops the run."""
        if stats.get("train_epsilon", 0) == 0:  # a clean warm-up epoch: nothing measured
            return
        self.summary = self.log.summary()
        stats.update(self.summary)
        loss = stats.get("train_loss")
        if self.guard and isinstance(loss, float) and not math.isfinite(loss):
            raise Collapsed(f"epoch {epoch}: the training loss is {loss} ({describe(self.summary)}); "
                            f"{self.advice}; last.pth keeps epoch {epoch - 1}")
        if unbalanced(self.summary, self.limit) and distributed.context().is_main:
            print(f"warning: epoch {epoch}: the MI loss dominates the step: {describe(self.summary)}, above "
                  f"--balance-limit {self.limit:g}; {self.advice}", file=sys.stderr, flush=True)

    def end_evaluation(self, epoch: int, stats: Dict[str, object]) -> None:
        """A clean accuracy that falls to chance after an adversarial epoch stops the run. A run
        that has never been above chance (a tiny or slow start) is not stopped."""
        clean = stats.get("clean_acc")
        if not isinstance(clean, float):
            return
        if not collapsed(clean, self.num_classes):
            self.above_chance = True
            return
        if self.guard and self.above_chance and stats.get("train_epsilon", 0) != 0:
            raise Collapsed(f"epoch {epoch}: held-out clean accuracy fell to {clean:.2f} %, chance is "
                            f"{100 / self.num_classes:.3g} %; {describe(self.summary)}; {self.advice}; last.pth "
                            f"keeps epoch {epoch - 1} and the best model is unchanged (--no-collapse-guard "
                            "trains on)")

    def resume_from(self, records: Sequence[dict]) -> None:
        """Whether an earlier epoch of a resumed run was above chance."""
        self.above_chance = any(isinstance(r.get("clean_acc"), float) and not collapsed(r["clean_acc"],
                                                                                        self.num_classes)
                                for r in records)
