"""Stage-2 estimator objectives (PAPER.md §5) and the Fig. 4 table; the stage-3 loss L_mi
(§6) is ``utils.namid.namid_loss``.

All functions are pure functions of per-sample MI vectors (shape (N,), from ``mi_per_sample``):
    mi_n_nat = Î_n(x, h(x))     natural MI of the natural input
    mi_n_adv = Î_n(x, h(x̃))     natural MI of the adversarial input
    mi_a_nat = Î_a(n, h(x))     adversarial MI of the natural input
    mi_a_adv = Î_a(n, h(x̃))     adversarial MI of the adversarial input
and boolean masks from ``utils.mi.patterns.select_samples``. In the paper's notation
a_n(v) = −Î_n(x, h(v)) and a_a(v) = −Î_a(n, h(v)); "v|S" is the batch vector zeroed outside S.
No function divides by an empty set or returns NaN; an empty set gives a zero that is still
attached to the inputs' graph, so ``loss.backward()`` always works.
"""
from typing import Dict, Optional, Tuple

import torch

from utils.mi.patterns import Selection, masked_mean
from utils.training import distributed

Tensor = torch.Tensor


def restrict(values: Tensor, mask: Tensor) -> Tensor:
    """values|S: the batch vector zeroed outside the set ``mask``."""
    return torch.where(mask, values, torch.zeros_like(values))


def safe_cosine(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Cosine similarity of two batch vectors; 0 (finite gradient) when either is all zero."""
    dot = (a * b).sum()
    # Clamp the squared product: clamp_min's zero gradient below eps² keeps sqrt's gradient finite.
    return dot / ((a * a).sum() * (b * b).sum()).clamp_min(eps * eps).sqrt()


def set_size(mask: Tensor, like: Tensor) -> Tensor:
    """|S| in ``like``'s dtype."""
    return mask.sum().to(like.dtype)


def if_nonempty(count: Tensor, term: Tensor) -> Tensor:
    """``term`` where the set of ``count`` elements is not empty, else a zero (no NaN, still attached)."""
    return torch.where(count > 0, term, torch.zeros_like(term))


def estimator_loss_release(
    mi_n_nat: Tensor,
    mi_n_adv: Tensor,
    mi_a_nat: Tensor,
    mi_a_adv: Tensor,
    sel: Selection,
    *,
    cos_weight: float = 5.0,
    r_weight: float = 0.5,
    a_r_cos_weight: float = 8.0,
    a_r_sum_weight: float = 0.1,
) -> Tuple[Tensor, Tensor]:
    """The release's stage-2 losses (loss for E_n, loss for E_a), minimised (§5 "Release").

    E_n: L = L_W + r·L_R,  L_R = w·|1 − cos(a_n(x)|R, a_n(x̃)|R)| + Σ_R a_n(x)/|C|,
                           L_W = w·|cos(a_n(x)|W, a_n(x̃)|W)| + Σ_W a_n(x)/|C|.
    E_a: L = L_W + r·L_R,  L_W = w·|cos(a_a(x̃)|W, a_a(x)|W)| + Σ_W a_a(x̃)/|W|,
                           L_R = w_R·|1 − cos(a_a(x)|R, a_a(x̃)|R)| − s_R·Σ_R a_a(x̃)/|R|.
    w = ``cos_weight``, r = ``r_weight``, w_R = ``a_r_cos_weight``, s_R = ``a_r_sum_weight``.
    L_R (L_W) is 0 when R (W) is empty; when C is empty L = mean a_n(x) (mean a_a(x̃)) over the batch.
    """
    n_c, n_r, n_w = (set_size(m, mi_n_nat) for m in (sel.correct, sel.right, sel.wrong))

    an_x, an_xa = -mi_n_nat, -mi_n_adv
    an_x_r, an_xa_r = restrict(an_x, sel.right), restrict(an_xa, sel.right)
    an_x_w, an_xa_w = restrict(an_x, sel.wrong), restrict(an_xa, sel.wrong)
    c_den = n_c.clamp_min(1)
    n_r_term = cos_weight * (1 - safe_cosine(an_x_r, an_xa_r)).abs() + an_x_r.sum() / c_den
    n_w_term = cos_weight * safe_cosine(an_x_w, an_xa_w).abs() + an_x_w.sum() / c_den
    loss_n = if_nonempty(n_w, n_w_term) + r_weight * if_nonempty(n_r, n_r_term)
    loss_n = torch.where(n_c > 0, loss_n, an_x.mean())

    aa_x, aa_xa = -mi_a_nat, -mi_a_adv
    aa_x_r, aa_xa_r = restrict(aa_x, sel.right), restrict(aa_xa, sel.right)
    aa_x_w, aa_xa_w = restrict(aa_x, sel.wrong), restrict(aa_xa, sel.wrong)
    a_w_term = cos_weight * safe_cosine(aa_xa_w, aa_x_w).abs() + aa_xa_w.sum() / n_w.clamp_min(1)
    a_r_term = (
        a_r_cos_weight * (1 - safe_cosine(aa_x_r, aa_xa_r)).abs()
        - a_r_sum_weight * aa_xa_r.sum() / n_r.clamp_min(1)
    )
    loss_a = if_nonempty(n_w, a_w_term) + r_weight * if_nonempty(n_r, a_r_term)
    loss_a = torch.where(n_c > 0, loss_a, aa_xa.mean())
    return loss_n, loss_a


def estimator_loss_paper(
    mi_n_nat: Tensor, mi_n_adv: Tensor, mi_a_nat: Tensor, mi_a_adv: Tensor, wrong: Tensor
) -> Tuple[Tensor, Tensor]:
    """Paper Eq. 5 as losses (loss for E_n, loss for E_a), minimised; 0 when W is empty (§5).

    E_n maximises mean_W Î_n(x, h(x)) − mean_W Î_n(x, h(x̃));
    E_a maximises mean_W Î_a(n, h(x̃)) − mean_W Î_a(n, h(x))."""
    loss_n = -(masked_mean(mi_n_nat, wrong) - masked_mean(mi_n_adv, wrong))
    loss_a = -(masked_mean(mi_a_adv, wrong) - masked_mean(mi_a_nat, wrong))
    return loss_n, loss_a


def estimator_loss_max(
    mi_n_nat: Tensor, mi_a_adv: Tensor, correct: Tensor, fooled: Tensor
) -> Tuple[Tensor, Tensor]:
    """Paper Eq. 4 ("MIM") as losses (loss for E_n, loss for E_a); 0 for an empty set (§5).

    E_n maximises mean_C Î_n(x, h(x)); E_a maximises Î_a(n, h(x̃)) averaged over ``fooled``,
    the samples whose attack succeeded (pred(x̃) ≠ y, ``utils.mi.patterns.attack_succeeded``)."""
    return -masked_mean(mi_n_nat, correct), -masked_mean(mi_a_adv, fooled)


_MI_NAMES = ("natural_mi_x", "natural_mi_xadv", "adversarial_mi_x", "adversarial_mi_xadv")


class MITable:
    """Accumulates the Fig. 4 table over batches: mean natural / adversarial MI of x and x̃ on R and W.

    Sums and counts are kept separately, so the result over several batches equals the result
    on their concatenation. They stay on the device as one float64 vector, read back once by
    ``result``: no host sync per batch. An empty set's means are NaN (there is nothing to average)."""

    KEYS = tuple(f"{name}_{split}" for name in _MI_NAMES for split in ("right", "wrong"))

    def __init__(self):
        self.totals: Optional[Tensor] = None  # the sums in KEYS' order, then |R| and |W|

    @torch.no_grad()
    def update(
        self, mi_n_nat: Tensor, mi_n_adv: Tensor, mi_a_nat: Tensor, mi_a_adv: Tensor, sel: Selection
    ) -> "MITable":
        values = torch.stack([mi_n_nat, mi_n_adv, mi_a_nat, mi_a_adv]).double()[:, None, :]
        masks = torch.stack([sel.right, sel.wrong])[None]
        sums = restrict(values, masks).sum(dim=-1)  # (4, 2): each MI term on R and on W
        batch = torch.cat([sums.flatten(), masks[0].sum(dim=-1).double()])
        self.totals = batch if self.totals is None else self.totals + batch
        return self

    def all_reduce(self, device) -> "MITable":
        """Sum the table over all processes under torchrun (a no-op in a single process)."""
        if self.totals is None:  # an empty shard still joins the reduction
            self.totals = torch.zeros(len(self.KEYS) + 2, dtype=torch.float64, device=device)
        distributed.all_reduce_sum(self.totals)
        return self

    def result(self) -> Dict[str, float]:
        totals = [0.0] * (len(self.KEYS) + 2) if self.totals is None else self.totals.tolist()
        n_right, n_wrong = int(totals[-2]), int(totals[-1])
        counts = {"right": n_right, "wrong": n_wrong}
        out = {}
        for key, total in zip(self.KEYS, totals):
            count = counts[key.rsplit("_", 1)[1]]
            out[key] = total / count if count else float("nan")
        out["n_right"] = n_right
        out["n_wrong"] = n_wrong
        return out
