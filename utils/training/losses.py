"""Adversarial training losses: Standard AT, TRADES and MART (PAPER.md §7, β = 6).

Each loss is a function of logits that the caller has already computed, so a training
step runs the model once per input and reuses the logits for accuracy and MI terms."""
from typing import Optional

import torch
import torch.nn.functional as F

ADV_LOSSES = ("ce", "trades", "mart")

# How each defense crafts its training examples: (PGD loss, random start).
ATTACK_FOR_LOSS = {"ce": ("ce", "uniform"), "trades": ("kl", "normal"), "mart": ("ce", "uniform")}


def standard_at_loss(logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Madry et al. (2018): cross-entropy on the adversarial examples."""
    return F.cross_entropy(logits_adv, y)


def trades_loss(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """Zhang et al. (2019), Eq. 5: CE(h(x), y) + β · KL(p(x) ‖ p(x̃)), KL averaged over the batch."""
    natural = F.cross_entropy(logits_nat, y)
    robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1), reduction="batchmean")
    return natural + beta * robust


def mart_loss(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """Wang et al. (2020), Eq. 9: boosted CE on x̃ + β · KL(p(x) ‖ p(x̃)) · (1 − p_y(x)).

    Boosted CE = CE(h(x̃), y) − log(1 − max_{k≠y} p_k(x̃)). The small constants keep the
    logarithms finite when a probability saturates."""
    probs_adv = F.softmax(logits_adv, dim=1)
    top2 = probs_adv.topk(2, dim=1).indices
    runner_up = torch.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])
    boosted_ce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - probs_adv + 1e-12), runner_up)

    probs_nat = F.softmax(logits_nat, dim=1)
    true_prob = probs_nat.gather(1, y.unsqueeze(1)).squeeze(1)
    kl = (probs_nat * (torch.log(probs_nat + 1e-12) - torch.log(probs_adv + 1e-12))).sum(dim=1)
    return boosted_ce + beta * (kl * (1.0000001 - true_prob)).mean()


def adversarial_loss(
    kind: str, logits_adv: torch.Tensor, y: torch.Tensor, logits_nat: Optional[torch.Tensor] = None, beta: float = 6.0
) -> torch.Tensor:
    """L_adv of the chosen defense: ``ce`` (Standard AT), ``trades`` or ``mart``."""
    if kind == "ce":
        return standard_at_loss(logits_adv, y)
    if logits_nat is None:
        raise ValueError(f"the {kind} loss needs the logits of the natural inputs")
    if kind == "trades":
        return trades_loss(logits_nat, logits_adv, y, beta)
    if kind == "mart":
        return mart_loss(logits_nat, logits_adv, y, beta)
    raise ValueError(f"unknown adversarial loss {kind!r}; expected one of {', '.join(ADV_LOSSES)}")


def needs_natural_logits(kind: str) -> bool:
    return kind != "ce"
