"""What the two stage-2 scripts share (PAPER.md §5): the frozen target, the adversarial batch,
the epoch loop, the per-epoch Fig. 4 table and its bar chart (their flags: ``utils.cli.add_stage2_args``).

The scripts keep what is special about them: the estimators they train and their loss."""
from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from models.custom import Normalization
from models.estimator import MIEstimator
from utils.attacks.base import eval_mode
from utils.attacks.pgd import pgd
from utils.mi.bounds import mi_per_sample
from utils.mi.estimators import target_outputs
from utils.mi.objectives import MITable
from utils.mi.patterns import select_samples, split_patterns
from utils.mi.release_compat import NONE, BatchNormReplay, Quirks, release_stage2_passes
from utils.plots import pyplot, save_figure
from utils.training import distributed
from utils.training.fast import FastPath
from utils.training.loop import StepFn, TrainAttack, accuracies, fit, format_metrics
from utils.training.run import Run
from utils.training.setup import DataSpec, DeviceSpec, StageSetup, frozen_target, setup

Tensor = torch.Tensor


# --------------------------------------------------------------------------- setup

class Stage2Spec(NamedTuple):
    """What a stage-2 run needs besides its estimators (``utils.cli.stage2_spec`` builds it from the flags)."""
    model_dir: str
    data: DataSpec
    where: DeviceSpec
    arch: str
    pre_target: str
    fast: FastPath
    attack: TrainAttack
    layer: Optional[str]  # the target layer the global nets read; None: the logits
    mode: str  # the MI bound (PAPER.md §3)
    quirks: Quirks = NONE
    progress: bool = True
    normalize: Optional[Normalization] = None  # the target's --normalize


@dataclass(frozen=True)
class Stage2Setup(StageSetup):
    """The shared setup (``training.setup.setup``), stage 2's frozen target, and the spec it came from."""
    target: nn.Module
    spec: Stage2Spec

    def attack_batch(self, x: Tensor, y: Tensor, num_steps: int) -> "AdvBatch":
        return attack_batch(self.target, x, y, self.spec.attack, self.spec.layer, num_steps,
                            normal_start=self.spec.quirks.start)


def prepare(spec: Stage2Spec) -> Stage2Setup:
    """Seed, load the data, build the loaders (``utils.training.setup.setup``), and load the frozen target
    (eval mode, no gradients). Under torchrun each process takes its shard of every training batch
    (the batch size is the global batch) and of the evaluation split; the estimators see the inputs
    augmented as in stage 1, as the target was trained on them."""
    shared = setup(spec.model_dir, spec.data, spec.where)
    target = frozen_target(spec.arch, spec.pre_target, shared.info, shared.device, spec.fast, spec.normalize)
    return Stage2Setup(**vars(shared), target=target, spec=spec)


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


def attack_batch(target: nn.Module, x: Tensor, y: Tensor, attack: TrainAttack, layer: Optional[str], num_steps: int,
                 normal_start: bool = False) -> AdvBatch:
    """x̃ = PGD(h_θ0, x); one no-grad forward of the frozen target on each of x and x̃. ``normal_start``:
    the release's start (``--release-start``)."""
    x_adv = pgd(target, x, y, attack.epsilon, attack.step_size, num_steps, attack.distance,
                random_start="normal" if normal_start else "uniform")
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

def _eval_batches(setup: Stage2Setup):
    fast = setup.spec.fast
    for x, y in fast.batches(setup.eval_loader, "eval", setup.spec.progress):
        with fast.autocast(x.device):
            yield setup.attack_batch(x, y, setup.spec.attack.eval_steps)


def evaluate_mi_table(setup: Stage2Setup, estimators: nn.ModuleDict) -> Dict[str, float]:
    """The Fig. 4 table (PAPER.md §5) on the evaluation split, plus the target's clean/PGD accuracy.

    R and W are the frozen target's, under the training attack (``--eval-steps`` steps)."""
    # Counts stay on the device: no host sync per batch, and NCCL reduces CUDA tensors only.
    spec = setup.spec
    table, counts, total = MITable(), torch.zeros(2, device=setup.device), 0
    with eval_mode(estimators):
        for b in _eval_batches(setup):
            with torch.no_grad():
                sel = select_samples(b.logits_nat, b.logits_adv, b.y, over_batch=spec.quirks.selection)
                table.update(*mi_vectors(estimators, b, spec.mode, estimate=True, quirks=spec.quirks), sel)
            counts += _correct(b)
            total += b.y.shape[0]
    return {**table.all_reduce(setup.device).result(), **accuracies(counts, total)}


def evaluate_standard_mi(setup: Stage2Setup, estimator: MIEstimator) -> Dict[str, float]:
    """Mean standard MI Î(x; h(x)) and Î(x̃; h(x̃)) on the evaluation split, plus the target's accuracy."""
    spec = setup.spec
    sums = torch.zeros(2, dtype=torch.float64, device=setup.device)
    counts, total = torch.zeros(2, device=setup.device), 0
    with eval_mode(estimator):
        for b in _eval_batches(setup):
            with torch.no_grad():
                mi_x = estimator.mi(b.x, b.g_nat, spec.mode, estimate=True, quirks=spec.quirks)
                mi_xadv = estimator.mi(b.x_adv, b.g_adv, spec.mode, estimate=True, quirks=spec.quirks)
            sums += torch.stack([mi_x.sum(), mi_xadv.sum()]).double()
            counts += _correct(b)
            total += b.y.shape[0]
    packed = distributed.all_reduce_sum(torch.cat([sums, sums.new_tensor([total])]))
    means = (packed[:2] / max(float(packed[2]), 1)).tolist()
    return {"standard_mi_x": means[0], "standard_mi_xadv": means[1], **accuracies(counts, total)}


def _correct(b: AdvBatch) -> Tensor:
    return torch.stack([(b.logits_nat.argmax(1) == b.y).sum(), (b.logits_adv.argmax(1) == b.y).sum()])


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

def adam(estimators: nn.ModuleDict, lr: float, milestones: Sequence[int], gamma: float):
    """Adam and MultiStepLR on the estimators (PAPER.md §5)."""
    optimizer = torch.optim.Adam(estimators.parameters(), lr=lr)
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma)


def fit_estimators(run: Run, first_epoch: int, setup: Stage2Setup, estimators: nn.ModuleDict, step: StepFn,
                   evaluate: Callable[[], Dict[str, float]], best: Dict[str, nn.Module]) -> None:
    """``utils.training.loop.fit`` for stage 2: only ``estimators`` is put in train mode (the target stays
    frozen in eval mode); each epoch writes the table to metrics.jsonl and mi_table.png. The run
    selects by epoch number: the estimator files are rewritten every epoch (best = last, as the
    release kept its last epoch)."""
    def show(record):
        plot_mi_table(record, run.dir / "mi_table.png")
        print(format_metrics(record) + "  " + summarize(record), flush=True)

    fit(run, first_epoch, estimators, setup.train_loader, lambda epoch: (step, {}), evaluate, best,
        fast=setup.spec.fast, progress=setup.spec.progress, show=show)


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
