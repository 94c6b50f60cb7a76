"""The epoch loop of every training stage, and what it is made of: the meters, one pass over the
data, clean and PGD accuracy, the clean warm-up and ε ramp of stages 1 and 3."""
import math
import time
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.attacks.base import eval_mode, unwrap
from utils.attacks.pgd import pgd
from utils.script import Interrupted, UserError
from utils.training import distributed
from utils.training.fast import FastPath
from utils.training.run import Run

StepFn = Callable[[torch.Tensor, torch.Tensor], tuple]


def epsilon_at(epoch: int, epsilon: float, warm_up_epochs: int = 0, ramp_epochs: int = 0) -> float:
    """Training budget at ``epoch`` (1-based): 0 in clean warm-up epochs, then a linear ramp over
    ``ramp_epochs`` adversarial epochs (none by default), then ``epsilon``."""
    adversarial_epoch = epoch - warm_up_epochs
    if adversarial_epoch < 1:
        return 0.0
    if ramp_epochs > 0 and adversarial_epoch < ramp_epochs:
        return epsilon * adversarial_epoch / ramp_epochs
    return epsilon


class Meter:
    """Running sums kept as tensors, so training never waits on the device for a ``.item()``."""

    def __init__(self):
        self.sums: Dict[str, torch.Tensor] = {}
        self.counts: Dict[str, float] = {}

    def add(self, name: str, value: torch.Tensor, n: float = 1.0) -> None:
        value = value.detach().double() * n  # float64 sums: many float32 batch means would round off
        self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.counts[name] = self.counts.get(name, 0.0) + n

    def result(self) -> Dict[str, float]:
        """Means over everything added, summed over all processes under torchrun."""
        names = sorted(self.sums)
        if not names:
            return {}
        sums = torch.stack([self.sums[k].reshape(()) for k in names]).double()
        counts = torch.tensor([self.counts[k] for k in names], dtype=torch.float64, device=sums.device)
        distributed.all_reduce_sum(sums)
        distributed.all_reduce_sum(counts)
        return {k: float(s) / max(float(c), 1e-12) for k, s, c in zip(names, sums.cpu(), counts.cpu())}


def train_epoch(model: nn.Module, loader, step: StepFn, optimizer, desc: str,
                progress: bool = True, fast: FastPath = FastPath()) -> Dict[str, float]:
    """One pass over ``loader``. ``step(x, y)`` returns (loss, logits for accuracy, {name: scalar})."""
    model.train()
    meter = Meter()
    for x, y in fast.batches(loader, desc, progress):
        with fast.autocast(x.device):
            loss, logits, extra = step(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if distributed.context().enabled and not isinstance(model, nn.parallel.DistributedDataParallel):
            distributed.average_gradients(model)  # e.g. the stage-2 estimators, used through their parts
        optimizer.step()
        n = y.shape[0]
        meter.add("train_loss", loss, n)
        meter.add("train_acc", (logits.argmax(dim=1) == y).float().mean() * 100, n)
        for name, value in extra.items():
            meter.add(name, torch.as_tensor(value, device=y.device), 1.0)
    return meter.result()


def evaluate(model: nn.Module, loader, epsilon: float, step_size: float, num_steps: int, norm: str,
             progress: bool = True, desc: str = "eval", fast: FastPath = FastPath()) -> Dict[str, float]:
    """Clean and PGD accuracy (%) in eval mode, summed over all processes under torchrun."""
    net = unwrap(model)  # no DDP collectives per batch: each process evaluates its own shard
    hits, total = None, 0
    with eval_mode(net):
        for x, y in fast.batches(loader, desc, progress):
            with fast.autocast(x.device):
                with torch.no_grad():
                    clean = (net(x).argmax(dim=1) == y).sum()
                x_adv = pgd(net, x, y, epsilon, step_size, num_steps, norm)
                with torch.no_grad():
                    robust = (net(x_adv).argmax(dim=1) == y).sum()
            batch = torch.stack([clean, robust]).double()
            hits = batch if hits is None else hits + batch
            total += y.shape[0]  # known on the host: a tensor of it per batch would be a copy to the device
    if hits is None:  # an empty shard still joins the reduction
        hits = torch.zeros(2, dtype=torch.float64)
    return accuracies(hits, total)


def accuracies(hits: torch.Tensor, total: int) -> Dict[str, float]:
    """Clean and PGD accuracy (%) from this process's (clean, robust) hit counts over ``total``
    examples, summed over all processes under torchrun: one reduction, one read-back."""
    hits = hits.double()
    packed = distributed.all_reduce_sum(torch.cat([hits, hits.new_tensor([total])]))
    clean, robust = (100.0 * packed[:2] / packed[2].clamp_min(1)).tolist()
    return {"clean_acc": clean, "pgd_acc": robust}


def cross_entropy_step(model: nn.Module) -> StepFn:
    """A clean training step, for warm-up epochs."""
    def step(x, y):
        logits = model(x)
        return F.cross_entropy(logits, y), logits, {}
    return step


def format_metrics(record: dict) -> str:
    names = ("epoch", "lr", "train_loss", "train_acc", "clean_acc", "pgd_acc", "train_seconds", "seconds")
    keys = [k for k in names if k in record]
    return "  ".join(f"{k}={record[k]:.4g}" if isinstance(record[k], float) else f"{k}={record[k]}" for k in keys)


def check_finite(stats: Dict[str, float], epoch: int) -> None:
    """Stop a diverged run before its epoch is committed, rather than train on NaN to the end."""
    loss = stats.get("train_loss")
    if loss is not None and not math.isfinite(loss):
        raise UserError(f"training diverged in epoch {epoch} (train_loss {loss}); last.pth keeps epoch {epoch - 1}: "
                        "lower --lr (or --alpha, --lr-mi)")


def json_safe(metrics: Dict[str, object]) -> Dict[str, object]:
    """NaN (a mean over an empty set) and ±inf become None: metrics.jsonl stays strict JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


StepsFor = Callable[[int], Tuple[StepFn, Dict[str, float]]]
# Called with (epoch, the epoch's metrics so far); may add metrics, or raise to stop the run
# before the epoch is saved.
EpochHook = Callable[[int, Dict[str, object]], None]


def fit(run: Run, first_epoch: int, trained: nn.Module, train_loader, steps_for: StepsFor,
        evaluate_epoch: Callable[[], Dict[str, float]], best: Dict[str, nn.Module], *, fast: FastPath = FastPath(),
        progress: bool = True, on_epoch: Optional[Callable[[int], None]] = None,
        after_training: Optional[EpochHook] = None, after_evaluation: Optional[EpochHook] = None,
        show: Callable[[dict], None] = lambda record: print(format_metrics(record), flush=True)) -> None:
    """The one epoch loop of stages 1–3, from ``first_epoch`` (``run.start()``) to ``run.epochs``.

    Each epoch: ``on_epoch(epoch)``; one pass of ``steps_for(epoch)``'s step over the training
    data with ``trained`` in train mode (the step's second value, e.g. the epoch's ε, goes into
    the record); ``after_training(epoch, stats)``; the scheduler's step; ``evaluate_epoch()``;
    ``after_evaluation(epoch, stats)``; ``run.end_epoch`` (best files,
    metrics line, last.pth); ``show(record)`` in the first process. Ctrl-C becomes
    ``Interrupted`` with the advice that fits what the run kept."""
    main = distributed.context().is_main
    try:
        for epoch in range(first_epoch, run.epochs + 1):
            began = time.time()
            if on_epoch is not None:
                on_epoch(epoch)
            step, fields = steps_for(epoch)
            lr = run.optimizer.param_groups[0]["lr"]
            stats = {**fields, **train_epoch(trained, train_loader, step, run.optimizer,
                                             f"epoch {epoch}/{run.epochs}", progress and main, fast)}
            # train_epoch reads its metrics back from the device, so the clock has waited for the GPU
            stats["train_seconds"] = time.time() - began
            if after_training is not None:
                after_training(epoch, stats)
            check_finite(stats, epoch)
            run.scheduler.step()
            stats.update(evaluate_epoch())
            if after_evaluation is not None:
                after_evaluation(epoch, stats)
            record = run.end_epoch(epoch, json_safe({"lr": lr, **stats, "seconds": time.time() - began}),
                                   best=best)
            if main:
                show(record)
    except KeyboardInterrupt:
        raise Interrupted(run.interrupted_advice()) from None


def target_steps(model: nn.Module, adversarial_step: Callable, epsilon: float, step_size: float,
                 warm_up_epochs: int, ramp_epochs: int) -> StepsFor:
    """Stages 1 and 3: clean cross-entropy in warm-up epochs, then ``adversarial_step(x, y, ε, step)``
    at the epoch's budget (``epsilon_at``), the step size scaled with it."""
    def steps_for(epoch: int):
        eps = epsilon_at(epoch, epsilon, warm_up_epochs, ramp_epochs)
        if eps == 0:
            return cross_entropy_step(model), {"train_epsilon": eps}

        def step(x, y):
            return adversarial_step(x, y, eps, step_size * eps / epsilon)
        return step, {"train_epsilon": eps}
    return steps_for


class TrainAttack(NamedTuple):
    """The PGD of a training stage (PAPER.md §7; ``add_attack_args``): its budget and step, and its
    steps per training batch and per evaluation batch."""
    epsilon: float
    step_size: float
    num_steps: int
    eval_steps: int
    distance: str = "l_inf"


def fit_target(run: Run, first_epoch: int, model: nn.Module, train_loader, eval_loader, adversarial_step: Callable,
               best_file: str, attack: TrainAttack, *, warm_up_epochs: int = 0, ramp_epochs: int = 0,
               fast: FastPath = FastPath(), progress: bool = True, on_epoch: Optional[Callable[[int], None]] = None,
               after_training: Optional[EpochHook] = None, after_evaluation: Optional[EpochHook] = None) -> None:
    """``fit`` for stages 1 and 3: clean warm-up and ε ramp, and each epoch's clean and PGD
    accuracy (and their mean) on the evaluation split."""
    def evaluate_epoch():
        stats = evaluate(model, eval_loader, attack.epsilon, attack.step_size, attack.eval_steps, attack.distance,
                         progress and distributed.context().is_main, fast=fast)
        return {**stats, "mean_acc": (stats["clean_acc"] + stats["pgd_acc"]) / 2}

    fit(run, first_epoch, model, train_loader,
        target_steps(model, adversarial_step, attack.epsilon, attack.step_size, warm_up_epochs, ramp_epochs),
        evaluate_epoch, {best_file: model}, fast=fast, progress=progress, on_epoch=on_epoch,
        after_training=after_training, after_evaluation=after_evaluation)
