"""Trust checks in the spirit of AutoAttack's ``checks.py`` (PAPER.md §7): signs that an evaluation
cannot be trusted (randomness, zero gradients, probabilities instead of logits, a model left in
train mode, robust above clean, PGD below AutoAttack, accuracy that rises with ε). Each returns
its warning's text, or None / an empty list when all is well."""
import math
import re
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.attacks.base import attack_mode, unwrap
from utils.attacks.registry import Attack
from utils.evaluation.results import ModelResult, accuracy

# Above this fraction of zero input gradients in a batch, gradient attacks are blind there.
# (AutoAttack warns on any; a few saturated softmaxes in a confident model are not masking.)
ZERO_GRADIENT_FRACTION = 0.1
# AutoAttack's tolerance on L2-normalised logits for two passes of the same input.
RANDOMNESS_TOL = 1e-4
# AutoAttack's tolerance for "the outputs sum to one".
PROBABILITY_TOL = 1e-5


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
