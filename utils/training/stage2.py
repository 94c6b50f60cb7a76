"""What the two stage-2 scripts share (PAPER.md §5): flags, the frozen target, the
adversarial batch, the epoch loop, the per-epoch Fig. 4 table and its bar chart.

The scripts keep what is special about them: the estimators they train and their loss."""
import argparse
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
from tqdm import tqdm

from models.estimator import MIEstimator
from utils.attacks.pgd import pgd
from utils.cli import (
    Parser,
    add_attack_args,
    add_data_args,
    add_estimator_args,
    add_model_args,
    add_run_args,
    add_speed_args,
    check_non_negative,
    check_positive,
    finish_attack_args,
    finish_estimator_args,
    number,
)
from utils.data.loaders import BatchLoader
from utils.data.splits import DatasetInfo
from utils.mi.bounds import mi_per_sample
from utils.mi.estimators import internal_layer, target_outputs
from utils.mi.objectives import MITable
from utils.mi.patterns import select_samples, split_patterns
from utils.mi.release_compat import (
    NONE,
    BatchNormReplay,
    Quirks,
    add_release_args,
    finish_release_args,
    release_stage2_passes,
)
from utils.plots import pyplot, save_figure
from utils.training import distributed
from utils.training.loop import FastPath, StepFn, eval_mode, fit, format_metrics
from utils.training.run import Run
from utils.training.setup import frozen_target, setup

Tensor = torch.Tensor


# --------------------------------------------------------------------------- flags

def add_stage2_args(p: Parser, *, model_dir: str, epochs: int, batch_size: int, milestones, gamma: float) -> None:
    """Flags of both stage-2 scripts, with the release's names; the defaults are each script's."""
    add_data_args(p, selects=False)
    add_model_args(p)
    p.add_argument("--pre-target", required=True,
                   help="the frozen target h_θ0: stage 1's best_model.pth (or its last.pth)")
    add_estimator_args(p)
    add_release_args(p)
    # The paper's threat model, the one stage 1 trained for (L∞ 8/255, PGD-10, step ε/4).
    # The release's stage 2 defaulted to L2 ε 0.5 with 20 steps: --distance l_2 --num-steps 20.
    add_attack_args(p, num_steps=10, eval_steps=None)
    for action in p._actions:
        if action.dest == "eval_steps":
            action.help = "PGD steps for the per-epoch table and accuracy (default: --num-steps, the same attack)"
    p.add_argument("--epochs", type=int, default=epochs, help="estimator training epochs")
    p.add_argument("--batch-size", type=int, default=batch_size, help="images per step")
    p.add_argument("--lr-mi", type=number, default=1e-2, help="Adam learning rate of the estimators")
    p.add_argument("--lr-milestones", type=int, nargs="*", default=list(milestones),
                   help="epochs at which the learning rate is multiplied by --lr-gamma")
    p.add_argument("--lr-gamma", type=number, default=gamma, help="learning-rate factor at each milestone")
    add_speed_args(p)
    add_run_args(p, model_dir=model_dir)


def finish_stage2_args(p: Parser, args: argparse.Namespace) -> argparse.Namespace:
    if args.eval_steps is None:
        args.eval_steps = args.num_steps
    finish_attack_args(p, args)
    finish_estimator_args(p, args)
    finish_release_args(args)
    check_positive(p, args, "epochs", "batch_size", "lr_mi", "lr_gamma")
    check_non_negative(p, args, "save_freq", "val_size")
    return args


# --------------------------------------------------------------------------- setup

class Setup(NamedTuple):
    """The shared setup (``training.setup.setup``) with stage 2's frozen target and the layer its global nets read."""
    device: torch.device
    info: DatasetInfo
    train_loader: BatchLoader
    eval_loader: BatchLoader
    generator: torch.Generator
    target: nn.Module
    layer: Optional[str]


def prepare(args: argparse.Namespace) -> Setup:
    """Seed, load the data, build the loaders (``utils.training.setup.setup``), and load the frozen target
    (eval mode, no gradients). Under torchrun each process takes its shard of every training batch
    (--batch-size is the global batch) and of the evaluation split; the estimators see the inputs
    augmented as in stage 1, as the target was trained on them."""
    shared = setup(args)
    return Setup(*shared, frozen_target(args, shared.info, shared.device), internal_layer(args))


# --------------------------------------------------------------------------- one adversarial batch

class AdvBatch(NamedTuple):
    """A batch with its PGD counterpart: x, n = x̃ − x, and the target's outputs on x and x̃."""

    x: Tensor
    y: Tensor
    x_adv: Tensor
    n: Tensor
    logits_nat: Tensor
    g_nat: Tensor  # what the global nets read for h(x): logits or an internal layer
    logits_adv: Tensor
    g_adv: Tensor


def attack_batch(target: nn.Module, x: Tensor, y: Tensor, args, layer: Optional[str], num_steps: int) -> AdvBatch:
    """x̃ = PGD(h_θ0, x); one no-grad forward of the frozen target on each of x and x̃."""
    x_adv = pgd(target, x, y, args.epsilon, args.step_size, num_steps, args.distance,
                random_start="normal" if args.quirks.start else "uniform")
    with torch.no_grad():
        logits_nat, g_nat = target_outputs(target, x, layer)
        logits_adv, g_adv = target_outputs(target, x_adv, layer)
    x, n = split_patterns(x, x_adv)
    return AdvBatch(x, y, x_adv, n, logits_nat, g_nat, logits_adv, g_adv)


def global_batch(b: AdvBatch) -> AdvBatch:
    """The whole --batch-size batch under torchrun (each process attacked its shard), so that the
    MI terms, their negatives and the estimators' BatchNorm see what one process would."""
    return AdvBatch(*distributed.gather_batch(*b))


def mi_vectors(estimators, b: AdvBatch, mode: str, estimate: bool = False,
               quirks: Quirks = NONE) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(Î_n(x, h(x)), Î_n(x, h(x̃)), Î_a(n, h(x)), Î_a(n, h(x̃))), each (N,) (Eq. 5's four terms).

    Each local net encodes its pattern once; its features are scored against both global inputs.
    ``estimate``: MI values for reporting rather than the training objective (``mi_per_sample``);
    ``quirks``: the release's bounds."""
    e_n, e_a = estimators["natural"], estimators["adversarial"]
    local_x, local_n = e_n.local(b.x), e_a.local(b.n)
    return (
        mi_per_sample(local_x, e_n.global_(b.g_nat), mode, estimate, quirks),
        mi_per_sample(local_x, e_n.global_(b.g_adv), mode, estimate, quirks),
        mi_per_sample(local_n, e_a.global_(b.g_nat), mode, estimate, quirks),
        mi_per_sample(local_n, e_a.global_(b.g_adv), mode, estimate, quirks),
    )


class ReleasePasses:
    """``--release-passes`` in stage 2: the estimators' BatchNorm running statistics as the
    release's per-term passes left them (``release_stage2_passes``). Create it before the
    step's own passes; ``finish`` replays the release's sequence once the sets are known."""

    def __init__(self, estimators):
        self.replays = {kind: (BatchNormReplay(est.local), BatchNormReplay(est.global_))
                        for kind, est in estimators.items()}

    def finish(self, b: AdvBatch, sel) -> None:
        order = release_stage2_passes(int(sel.correct.sum()), int(sel.right.sum()), int(sel.wrong.sum()))
        for kind, pattern in (("natural", b.x), ("adversarial", b.n)):
            local, global_ = self.replays[kind]
            local.run([pattern] * len(order[kind]))
            global_.run([b.g_nat if which == "nat" else b.g_adv for which in order[kind]])


# --------------------------------------------------------------------------- evaluation

def _eval_batches(setup: Setup, args, progress: bool):
    fast = FastPath.from_args(args)
    for x, y in tqdm(setup.eval_loader, desc="eval", leave=False, disable=not progress, dynamic_ncols=True):
        x = fast.batch(x)
        with fast.autocast(x.device):
            yield attack_batch(setup.target, x, y, args, setup.layer, args.eval_steps)


def _accuracies(counts: Tensor, total: int) -> Dict[str, float]:
    packed = distributed.all_reduce_sum(torch.cat([counts.double(), counts.new_tensor([total], dtype=torch.float64)]))
    counts, total = packed[:2], float(packed[2])
    clean, robust = (100.0 * counts / max(total, 1)).tolist()
    return {"clean_acc": clean, "pgd_acc": robust}


def evaluate_mi_table(setup: Setup, estimators: nn.ModuleDict, args, progress: bool = True) -> Dict[str, float]:
    """The Fig. 4 table (PAPER.md §5) on the evaluation split, plus the target's clean/PGD accuracy.

    R and W are the frozen target's, under the training attack (``--eval-steps`` steps)."""
    # Counts stay on the device: no host sync per batch, and NCCL reduces CUDA tensors only.
    table, counts, total = MITable(), torch.zeros(2, device=setup.device), 0
    with eval_mode(estimators):
        for b in _eval_batches(setup, args, progress):
            with torch.no_grad():
                sel = select_samples(b.logits_nat, b.logits_adv, b.y, over_batch=args.quirks.selection)
                table.update(*mi_vectors(estimators, b, args.mi_mode, estimate=True, quirks=args.quirks), sel)
            counts += _correct(b)
            total += b.y.shape[0]
    return {**table.all_reduce(setup.device).result(), **_accuracies(counts, total)}


def evaluate_standard_mi(setup: Setup, estimator: MIEstimator, args, progress: bool = True) -> Dict[str, float]:
    """Mean standard MI Î(x; h(x)) and Î(x̃; h(x̃)) on the evaluation split, plus the target's accuracy."""
    sums = torch.zeros(2, dtype=torch.float64, device=setup.device)
    counts, total = torch.zeros(2, device=setup.device), 0
    with eval_mode(estimator):
        for b in _eval_batches(setup, args, progress):
            with torch.no_grad():
                mi_x = estimator.mi(b.x, b.g_nat, args.mi_mode, estimate=True, quirks=args.quirks)
                mi_xadv = estimator.mi(b.x_adv, b.g_adv, args.mi_mode, estimate=True, quirks=args.quirks)
            sums += torch.stack([mi_x.sum(), mi_xadv.sum()]).double()
            counts += _correct(b)
            total += b.y.shape[0]
    packed = distributed.all_reduce_sum(torch.cat([sums, sums.new_tensor([total])]))
    means = (packed[:2] / max(float(packed[2]), 1)).tolist()
    return {"standard_mi_x": means[0], "standard_mi_xadv": means[1], **_accuracies(counts, total)}


def _correct(b: AdvBatch) -> Tensor:
    return torch.stack([(b.logits_nat.argmax(1) == b.y).sum(), (b.logits_adv.argmax(1) == b.y).sum()]).float()


# --------------------------------------------------------------------------- the bar chart

def plot_mi_table(record: dict, path) -> None:
    """Bar chart of one epoch's table, written atomically: the Fig. 4 panels (R, W), or the
    two standard-MI bars when ``record`` holds ``standard_mi_x``."""
    plt = pyplot()

    def value(key):
        v = record.get(key)
        return float("nan") if v is None else v

    inputs = ("x", "xadv")
    labels = ("$x$", r"$\tilde{x}$")
    if "standard_mi_x" in record:
        fig, ax = plt.subplots(figsize=(3.5, 3.2))
        ax.bar(labels, [value(f"standard_mi_{v}") for v in inputs], color=["tab:blue", "tab:red"])
        ax.set_ylabel("standard MI Î(v; h(v))")
        ax.set_title(f"epoch {record.get('epoch', '?')}")
        panels = [ax]
    else:
        fig, panels = plt.subplots(1, 2, figsize=(7, 3.2), sharey=True)
        width = 0.38
        for ax, split, title in zip(panels, ("right", "wrong"), ("R (attack failed)", "W (attack succeeded)")):
            for offset, kind, color in ((-width / 2, "natural", "tab:blue"), (width / 2, "adversarial", "tab:red")):
                ax.bar([i + offset for i in range(2)], [value(f"{kind}_mi_{v}_{split}") for v in inputs], width,
                       label=f"{kind} MI", color=color)
            ax.set_xticks(range(2), labels)
            ax.set_title(f"{title}, n = {record.get('n_' + split, 0)}")
        panels[0].set_ylabel("mean MI estimate")
        handles, names = panels[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="lower center", ncol=2, fontsize="small", frameon=False)
        fig.suptitle(f"epoch {record.get('epoch', '?')}")
    for ax in panels:
        ax.axhline(0.0, color="black", linewidth=0.6)
    fig.tight_layout(rect=(0, 0.07 if len(panels) > 1 else 0, 1, 1))
    save_figure(fig, path)


# --------------------------------------------------------------------------- the epoch loop

def estimator_run(args, setup: Setup, estimators: nn.ModuleDict) -> Run:
    """Adam and MultiStepLR on the estimators (PAPER.md §5), in a run that selects by epoch number:
    the estimator files are rewritten every epoch (best = last, as the release kept its last epoch)."""
    optimizer = torch.optim.Adam(estimators.parameters(), lr=args.lr_mi)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.lr_milestones, gamma=args.lr_gamma)
    return Run.from_args(args, {"estimators": estimators}, optimizer, scheduler, setup.generator, select_by="epoch")


def fit_estimators(run: Run, first_epoch: int, args, setup: Setup, estimators: nn.ModuleDict, step: StepFn,
                   evaluate: Callable[[], Dict[str, float]], best: Dict[str, nn.Module]) -> None:
    """``utils.training.loop.fit`` for stage 2: only ``estimators`` is put in train mode (the target stays
    frozen in eval mode); each epoch writes the table to metrics.jsonl and mi_table.png."""
    def show(record):
        plot_mi_table(record, run.dir / "mi_table.png")
        print(format_metrics(record) + "  " + summarize(record), flush=True)

    fit(run, first_epoch, estimators, setup.train_loader, lambda epoch: (step, {}), evaluate, best,
        fast=FastPath.from_args(args), progress=not args.no_progress, show=show)


def summarize(record: dict) -> str:
    """The table in one line: natural MI and adversarial MI of x / x̃ on W (or the standard MI)."""
    def fmt(key):
        v = record.get(key)
        return "n/a" if v is None else f"{v:.3g}"

    if "standard_mi_x" in record:
        return f"std_mi x/x̃={fmt('standard_mi_x')}/{fmt('standard_mi_xadv')}"
    return (f"|R|={record.get('n_right')} |W|={record.get('n_wrong')}  "
            f"W: nat_mi x/x̃={fmt('natural_mi_x_wrong')}/{fmt('natural_mi_xadv_wrong')} "
            f"adv_mi x/x̃={fmt('adversarial_mi_x_wrong')}/{fmt('adversarial_mi_xadv_wrong')}")
