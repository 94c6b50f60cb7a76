"""The method in one place: NAMID's loss (PAPER.md §6, paper Eq. 7–9) and WMIM's, usable from any
training loop.

    est_n, est_a = load_mi_estimators("checkpoints/mi_estimator", model, in_channels=3, num_classes=10)
    loss, logits_adv, terms = namid_objective(model, est_n, est_a, x, x_adv, y, alpha=5.0, lam=0.1)

``namid_loss`` is L_mi as a pure function of the four per-sample MI vectors; ``namid_objective``
computes those vectors from a model, the frozen estimators and a batch, and adds L_adv."""
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from models.estimator import MIEstimator
from utils.mi.bounds import mi_per_sample
from utils.mi.estimators import EstimatorSpec, build_estimators, internal_layer, load_estimators, target_outputs
from utils.mi.objectives import if_nonempty, restrict, safe_cosine, set_size
from utils.mi.patterns import masked_mean, select_samples, split_patterns
from utils.mi.release_compat import NONE, BatchNormReplay, Quirks, release_stage3_passes
from utils.training import distributed
from utils.training.balance import grad_balance
from utils.training.checkpoint import run_config
from utils.training.losses import adversarial_loss

Tensor = torch.Tensor


def namid_loss(
    mi_n_nat: Tensor,
    mi_n_adv: Tensor,
    mi_a_nat: Tensor,
    mi_a_adv: Tensor,
    wrong: Tensor,
    lam: float = 0.1,
    use_nat: bool = True,
    use_adv: bool = True,
    release: bool = False,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Stage-3 MI loss L_mi on W (§6, paper Eq. 7–9); the caller multiplies it by α.

    L_mi = |1 − cos(a_n(x)|W, a_n(x̃)|W)| + |1 − cos(a_a(x)|W, a_a(x̃)|W)|
           + λ·mean_W[Î_a(n, h(x̃)) − Î_n(x, h(x̃))];   L_mi = 0 when W is empty.
    The inputs are Î_n(x, h(x)), Î_n(x, h(x̃)), Î_a(n, h(x)), Î_a(n, h(x̃)), one value per
    sample, and a_n = −Î_n, a_a = −Î_a. ``use_nat=False`` drops the natural-MI terms (the
    a_n cosine and −Î_n in the λ term), ``use_adv=False`` the adversarial-MI terms (the a_a
    cosine and Î_a in the λ term): the ablations of Fig. 5. ``release=True`` keeps only the
    cosines (the release's λ = 0). Returns (L_mi, terms) with detached scalars ``cos_nat``,
    ``cos_adv``, ``lam_term`` (the λ-weighted term) that sum to L_mi; a disabled term is 0."""
    n_w = set_size(wrong, mi_n_nat)
    zero = restrict(mi_n_nat, wrong).sum() * 0.0  # attached, so L_mi.backward() works with all terms off
    cos_nat, cos_adv, gap = zero, zero, zero
    if use_nat:
        cos_nat = (1 - safe_cosine(restrict(-mi_n_nat, wrong), restrict(-mi_n_adv, wrong))).abs()
        gap = gap - masked_mean(mi_n_adv, wrong)
    if use_adv:
        cos_adv = (1 - safe_cosine(restrict(-mi_a_nat, wrong), restrict(-mi_a_adv, wrong))).abs()
        gap = gap + masked_mean(mi_a_adv, wrong)
    lam_term = zero if release else lam * gap
    # With W empty both cosines are 0, so |1 − cos| would be 1: zero them explicitly.
    cos_nat, cos_adv, lam_term = (if_nonempty(n_w, t) for t in (cos_nat, cos_adv, lam_term))
    loss = cos_nat + cos_adv + lam_term
    terms = {"cos_nat": cos_nat.detach(), "cos_adv": cos_adv.detach(), "lam_term": lam_term.detach()}
    return loss, terms


def namid_objective(model: nn.Module, est_n: MIEstimator, est_a: MIEstimator, x: Tensor, x_adv: Tensor, y: Tensor,
                    *, alpha: float = 5.0, lam: float = 0.1, adv_loss: str = "ce", beta: float = 6.0,
                    mode: str = "dv", layer: Optional[str] = None, use_nat: bool = True, use_adv: bool = True,
                    release_loss: bool = False, quirks: Quirks = NONE, measure_grads: bool = False,
                    mi_grad_clip: Optional[float] = None) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
    """L_all = L_adv + α·L_mi (Eq. 9) for one batch, with the model in train mode.

    One forward of x and one of x̃ serve L_adv (``adv_loss``: ce for NAMID, trades for NAMID-T,
    mart for NAMID-M), the selection of W and all four MI terms; the frozen local nets see x
    and n = x̃ − x once each, without gradient, so θ is trained through the global nets only.
    ``layer``: the target layer the global nets read (None: the logits). ``quirks`` switches
    on the release's numerics (PAPER.md §10). ``measure_grads`` adds ‖∇θ L_adv‖,
    ‖∇θ α·L_mi‖, their ratio and cosine to the scalars; ``mi_grad_clip`` ρ scales the MI
    gradient to at most ρ·‖∇θ L_adv‖ (``utils.training.balance.grad_balance``; off: the paper's
    objective). Returns (L_all, logits of x̃, scalars)."""
    replay = BatchNormReplay(model) if quirks.passes else None
    logits_nat, g_nat = target_outputs(model, x, layer)
    logits_adv, g_adv = target_outputs(model, x_adv, layer)
    l_adv = adversarial_loss(adv_loss, logits_adv, y, logits_nat, beta)
    natural, noise = split_patterns(x, x_adv)
    if quirks.selection:
        # The release's softmax runs over the whole batch: under torchrun, the global one.
        nat_all, adv_all, y_all = distributed.gather_batch(logits_nat.detach(), logits_adv.detach(), y)
        wrong = select_samples(nat_all, adv_all, y_all, over_batch=True).wrong
        g_nat, g_adv, natural, noise = distributed.gather_batch(g_nat, g_adv, natural, noise)
    else:
        wrong = select_samples(logits_nat.detach(), logits_adv.detach(), y).wrong
        # Under torchrun the MI terms range over the global batch, as in one process.
        g_nat, g_adv, natural, noise, wrong = distributed.gather_batch(g_nat, g_adv, natural, noise, wrong)
    mi_n_nat = mi_n_adv = mi_a_nat = mi_a_adv = torch.zeros(wrong.shape[0], device=wrong.device)
    with torch.no_grad():
        local_n = est_n.local(natural) if use_nat else None
        local_a = est_a.local(noise) if use_adv else None
    if use_nat:
        mi_n_nat = mi_per_sample(local_n, est_n.global_(g_nat), mode, quirks=quirks)
        mi_n_adv = mi_per_sample(local_n, est_n.global_(g_adv), mode, quirks=quirks)
    if use_adv:
        mi_a_nat = mi_per_sample(local_a, est_a.global_(g_nat), mode, quirks=quirks)
        mi_a_adv = mi_per_sample(local_a, est_a.global_(g_adv), mode, quirks=quirks)
    l_mi, terms = namid_loss(mi_n_nat, mi_n_adv, mi_a_nat, mi_a_adv, wrong, lam=lam, use_nat=use_nat,
                             use_adv=use_adv, release=release_loss)
    if replay is not None:
        replay.run(release_stage3_passes(x, x_adv, bool(wrong.any())))
    extra = {"l_adv": l_adv.detach(), "l_mi": l_mi.detach(), **terms, "w_size": wrong.sum().float()}
    if not measure_grads and mi_grad_clip is None:
        return l_adv + alpha * l_mi, logits_adv, extra
    loss, balance = grad_balance(model, l_adv, alpha * l_mi, clip=mi_grad_clip)
    return loss, logits_adv, {**extra, **balance}


def wmim_objective(model: nn.Module, standard: MIEstimator, x: Tensor, x_adv: Tensor, y: Tensor, *,
                   alpha: float = 5.0, adv_loss: str = "ce", beta: float = 6.0, mode: str = "dv",
                   layer: Optional[str] = None, quirks: Quirks = NONE, measure_grads: bool = False,
                   mi_grad_clip: Optional[float] = None) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
    """WMIM (after Zhu et al. 2020, PAPER.md §6): L_adv − α · mean Î(x̃; h(x̃)) with a frozen
    standard-MI estimator. Returns (loss, logits of x̃, scalars) as ``namid_objective``."""
    logits_nat = target_outputs(model, x, layer)[0] if adv_loss != "ce" else None
    logits_adv, g_adv = target_outputs(model, x_adv, layer)
    l_adv = adversarial_loss(adv_loss, logits_adv, y, logits_nat, beta)
    x_adv_all, g_adv = distributed.gather_batch(x_adv, g_adv)  # the global batch under torchrun
    with torch.no_grad():
        local = standard.local(x_adv_all)
    standard_mi = mi_per_sample(local, standard.global_(g_adv), mode, quirks=quirks).mean()
    extra = {"l_adv": l_adv.detach(), "standard_mi": standard_mi.detach()}
    if not measure_grads and mi_grad_clip is None:
        return l_adv - alpha * standard_mi, logits_adv, extra
    loss, balance = grad_balance(model, l_adv, -alpha * standard_mi, clip=mi_grad_clip)
    return loss, logits_adv, {**extra, **balance}


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients: how stage 3 uses the stage-2 estimators."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def load_mi_estimators(mi_dir, model: nn.Module, in_channels: int, num_classes: int,
                       image_size: int = 32) -> Tuple[MIEstimator, MIEstimator]:
    """(E_n, E_a) from a stage-2 folder, frozen, on ``model``'s device.

    The width H and the layer the global nets read come from the folder's config.json (as
    train_MI_estimator.py wrote it; without one, H = 2048 and the logits). ``image_size`` is
    needed only for estimators that read an internal layer."""
    config = run_config(mi_dir)
    spec = EstimatorSpec(config.get("va_hsize", 2048),
                         internal_layer(config.get("is_internal", False), config.get("is_internal_last", False)),
                         in_channels, num_classes, image_size)
    pair = build_estimators(spec, model, next(model.parameters()).device)
    load_estimators(pair, mi_dir)
    return freeze(pair["natural"]), freeze(pair["adversarial"])
