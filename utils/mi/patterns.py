"""Natural/adversarial pattern split and sample selection (PAPER.md §1, §4; paper Eq. 6)."""
from typing import NamedTuple, Tuple

import torch


def split_patterns(x: torch.Tensor, x_adv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(natural pattern x, adversarial pattern n = x̃ − x), both detached (§1)."""
    x = x.detach()
    return x, x_adv.detach() - x


class Selection(NamedTuple):
    """Boolean masks over the batch (Eq. 6): C correct on x; R ⊂ C robust on x̃; W ⊂ C fooled."""

    correct: torch.Tensor
    right: torch.Tensor
    wrong: torch.Tensor


def predict(logits: torch.Tensor, over_batch: bool = False) -> torch.Tensor:
    """Predicted class per sample: argmax over classes.

    ``over_batch`` is the release's rule (``--release-selection``, PAPER.md §10): the argmax of
    a softmax taken over the batch dimension, which ranks each class's logit against the other
    samples' logits of that class rather than against this sample's other classes."""
    if over_batch:
        return torch.softmax(logits.float(), dim=0).argmax(dim=1)
    return logits.argmax(dim=1)


def attack_succeeded(logits_adv: torch.Tensor, y: torch.Tensor, over_batch: bool = False) -> torch.Tensor:
    """pred(x̃) ≠ y, whether or not x itself was classified correctly (Eq. 4's adversarial set)."""
    return predict(logits_adv, over_batch) != y


def select_samples(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                   over_batch: bool = False) -> Selection:
    """C = {pred(x) = y}, W = C ∩ {pred(x̃) ≠ y}, R = C ∩ {pred(x̃) = y} (§4, Eq. 6).

    ``over_batch``: the release's prediction rule (see ``predict``)."""
    correct = predict(logits_nat, over_batch) == y
    fooled = attack_succeeded(logits_adv, y, over_batch)
    return Selection(correct=correct, right=correct & ~fooled, wrong=correct & fooled)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask``; 0 for an empty mask, still attached to the graph.

    ``torch.where`` rather than a product, so an inf/NaN outside the mask cannot leak in."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp_min(1).to(values.dtype)
