"""Per-sample mutual-information lower bounds between global and local features (PAPER.md §3).

Every bound is computed from one score tensor u[i, j, l] = <global_i, local_j[:, l]>: sample
i's global vector against sample j's local feature at location l. Positives are j = i, the
other samples of the batch are the negatives. Each function returns one value per sample,
because stages 2 and 3 weight and select samples individually.
"""
import math

import torch
import torch.nn.functional as F

from utils.mi.release_compat import NONE, Quirks

MI_MODES = ("dv", "jsd", "nce")


def resolve_mode(va_mode: str, va_fd_measure: str = "JSD") -> str:
    """Map the release's ``--va-mode`` / ``--va-fd-measure`` flags onto one of ``MI_MODES``."""
    mode = va_mode.lower()
    if mode in ("dv", "nce", "jsd"):
        return mode
    if mode == "fd":
        if va_fd_measure.upper() == "JSD":
            return "jsd"
        raise ValueError(f"--va-fd-measure {va_fd_measure!r} is not supported; only JSD is")
    raise ValueError(f"unknown --va-mode {va_mode!r}; expected one of dv, fd, nce (or jsd)")


def scores(local: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
    """u[i, j, l] = <global_i, local_j[:, l]>, shape (N, N, L) (PAPER.md §3 "Scores").

    ``local`` is (N, H, L) or (N, H, h, w); ``global_`` is (N, H) or (N, H, 1, 1)."""
    local = local.flatten(2) if local.dim() == 4 else local
    global_ = global_.flatten(1)
    if local.dim() != 3 or global_.dim() != 2 or local.shape[:2] != global_.shape:
        raise ValueError(f"local {tuple(local.shape)} and global {tuple(global_.shape)} do not match")
    # Scores feed exponentials (logsumexp, softplus): under bf16 autocast they are computed in fp32.
    with torch.autocast(device_type=local.device.type, enabled=False):
        dtype = torch.promote_types(torch.promote_types(local.dtype, global_.dtype), torch.float32)
        return torch.einsum("ih,jhl->ijl", global_.to(dtype), local.to(dtype))


def mi_per_sample(local: torch.Tensor, global_: torch.Tensor, mode: str = "dv",
                  estimate: bool = False, quirks: Quirks = NONE) -> torch.Tensor:
    """Per-sample MI lower bound Î_i, shape (N,), in one of ``MI_MODES`` (PAPER.md §3).

    - ``dv``: u_ii,l − (logsumexp_{j≠i} u_ij,l − log(N−1)), averaged over l.
    - ``jsd``: mean_l[log 2 − sp(−u_ii,l)] − mean_{j≠i,l}[sp(−u_ij,l) + u_ij,l − log 2].
    - ``nce``: for each (i, l), the log-softmax of u_ii,l among the candidates
      {u_ii,l} ∪ {u_ij,l' : j≠i, every l'} — one positive against every local feature of every
      other sample, as in DIM — averaged over l: a log-probability, ≤ 0. This is the value the
      losses use: the cosine terms of stages 2 and 3 are not invariant to an added constant.
      With ``estimate`` (for reporting an MI value) log(#candidates) = log(1 + (N−1)·L) is
      added, giving an estimate in (−inf, log(1 + (N−1)·L)]; DV and JSD ignore the flag.

    With N = 1 there are no negatives, so no bound exists: zeros are returned (still attached
    to the graph, so a caller's backward does not fail).

    ``quirks`` restores the release's bounds (PAPER.md §10): ``dv_mask`` leaves the positive
    in DV's logsumexp as a 0, which subtracts mean_l softplus(−logsumexp_{j≠i} u_ij,l) from Î_i;
    ``nce_mask`` keeps sample i's own L locations among InfoNCE's candidates at a score of −10;
    ``batch_bounds`` gives every sample the batch mean in the jsd and nce modes."""
    if mode not in MI_MODES:
        raise ValueError(f"unknown MI mode {mode!r}; expected one of {MI_MODES}")
    u = scores(local, global_)
    n, _, n_loc = u.shape
    pos = torch.diagonal(u, dim1=0, dim2=1).transpose(0, 1)  # (N, L): u[i, i, l]
    if n == 1:
        return pos.mean(dim=1) * 0.0
    # Exclude the positive with −inf (the release used 0, which leaks a constant into the bound).
    eye = torch.eye(n, dtype=torch.bool, device=u.device).unsqueeze(-1)
    if mode == "dv":
        masked = u.masked_fill(eye, 0.0 if quirks.dv_mask else float("-inf"))
        neg = torch.logsumexp(masked, dim=1) - math.log(n - 1)
        return (pos - neg).mean(dim=1)
    if mode == "jsd":
        pos_term = (math.log(2.0) - F.softplus(-pos)).mean(dim=1)
        # softplus(−u) + u == softplus(u); the right side does not cancel for large |u|.
        neg_all = (F.softplus(u) - math.log(2.0)).masked_fill(eye, 0.0)
        neg_term = neg_all.sum(dim=(1, 2)) / ((n - 1) * n_loc)
        return _per_sample(pos_term - neg_term, quirks)
    neg = torch.logsumexp(u.masked_fill(eye, float("-inf")).flatten(1), dim=1, keepdim=True)  # (N, 1)
    candidates = 1 + (n - 1) * n_loc
    if quirks.nce_mask:  # L more candidates per sample, each exp(−10)
        neg = torch.logaddexp(neg, torch.full_like(neg, math.log(n_loc) - 10.0))
        candidates += n_loc
    log_prob = pos - torch.logaddexp(pos, neg)
    offset = math.log(candidates) if estimate else 0.0
    return _per_sample(log_prob.mean(dim=1) + offset, quirks)


def _per_sample(values: torch.Tensor, quirks: Quirks) -> torch.Tensor:
    """The release's JSD and InfoNCE losses are one scalar per batch: every sample gets the mean."""
    return values.mean().expand_as(values) if quirks.batch_bounds else values
