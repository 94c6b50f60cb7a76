"""The evaluation engine behind test_comparison.py (PAPER.md §7).

Every attack runs over the same examples, in the same batches; each model's clean
predictions are computed once and reused. Each batch's random stream is seeded from the seed and
the batch's index, so a batch's result does not depend on which batches ran before it, nor on
the process that ran it: under torchrun each process takes a contiguous block of whole batches
and the results are gathered in order, every example counted once.

Per-model results live in ``utils.evaluation.results``, the trust checks run on them in
``utils.evaluation.checks``, and the tables, JSON and plot that report them are made by
``utils.evaluation.output``."""
import contextlib
import dataclasses
import hashlib
import math
import re
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from utils.attacks.autoattack import resume_from
from utils.attacks.registry import Attack, attack_outcome
from utils.data.loaders import BatchLoader
from utils.data.splits import Split
from utils.evaluation.checks import (
    check_eval_mode,
    check_output_range,
    check_randomness,
    check_results,
    check_sweep,
    check_zero_gradients,
)
from utils.evaluation.results import ModelResult, Report, forward_warnings
from utils.training import distributed
from utils.training.device import seed_everything
from utils.training.fast import FastPath

# Batch k of an attack starts from seed + BATCH_SEED_STRIDE·k: batch 0 keeps the seed itself.
BATCH_SEED_STRIDE = 1_000_003

# ---------------------------------------------------------------- the engine


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Evaluation:
    """Run attacks over the first-N examples of ``split`` against ``targets`` (name → model).

    White-box: each target is attacked through its own gradients. Transfer (``surrogate``
    given): each attack is crafted once on the surrogate and the same examples are fed to
    every target; targets then only ever run under ``torch.no_grad()``.

    ``aa_state``: a folder where AutoAttack keeps each batch's progress (``resume_from``); run again
    with the same folder, the finished sub-attacks of every batch are read back, not repeated."""

    def __init__(self, targets: Dict[str, nn.Module], split: Split, *, batch_size: int, device,
                 surrogate: Optional[nn.Module] = None, seed: int = 0, progress: bool = True,
                 report: Optional[Report] = None, aa_state: Optional[Path] = None):
        self.targets = targets
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.first_batch, shard = self._shard(len(split))
        # Once: every pass then batches it on the device.
        self.split = (split if len(shard) == len(split) else split.subset(shard)).to(self.device)
        self.surrogate = surrogate
        self.seed = seed
        self.progress = progress
        self.report = report if report is not None else Report()
        self.aa_state = None if aa_state is None else Path(aa_state)
        self.results: Dict[str, ModelResult] = {}
        self._clean: Dict[str, torch.Tensor] = {}  # each target's clean mask, on the device

    @property
    def transfer(self) -> bool:
        return self.surrogate is not None

    def _shard(self, n: int) -> Tuple[int, torch.Tensor]:
        """(index of this process's first batch, its examples): a contiguous block of whole batches."""
        ctx = distributed.context()
        batches = math.ceil(n / self.batch_size)
        per = math.ceil(batches / ctx.world_size)
        first = min(ctx.rank * per, batches)
        last = min(first + per, batches)
        return first, torch.arange(first * self.batch_size, min(last * self.batch_size, n))

    def _batches(self, desc: Optional[str]) -> Iterator[Tuple[torch.Tensor, torch.Tensor, slice, int]]:
        """(x, y, where in this process's split, the batch's index in the whole split) per batch, in
        order; a progress bar unless ``desc`` is None."""
        # A uint8 Split is scaled to [0, 1] per batch; float tensors (utils.evaluation.api) batch as they are.
        loader = (self.split.batches(self.batch_size) if hasattr(self.split, "batches")
                  else BatchLoader(self.split, self.batch_size, device=self.device))
        start = 0
        bar = desc is not None and self.progress
        for k, (x, y) in enumerate(FastPath().batches(loader, desc, bar)):
            yield x, y, slice(start, start + y.shape[0]), self.first_batch + k
            start += y.shape[0]

    def _sources(self) -> List[Tuple[str, nn.Module, List[str]]]:
        """(label, model whose gradients craft the examples, targets that are evaluated on them)."""
        if self.transfer:
            return [("surrogate", self.surrogate, list(self.targets))]
        return [(name, model, [name]) for name, model in self.targets.items()]

    def prepare(self) -> Dict[str, ModelResult]:
        """Eval mode, trust checks on the first batch, and each target's clean mask (once)."""
        for model in [*self.targets.values(), *([self.surrogate] if self.transfer else [])]:
            model.eval()
        first = next(self._batches(None), None)
        if first is None:  # a process with no batch (fewer batches than processes)
            for name in self.targets:
                self._clean[name] = torch.zeros(0, dtype=torch.bool, device=self.device)
                self.results[name] = ModelResult(name, self._clean[name].cpu())
                self.results[name].seconds["clean"] = 0.0
            return self.results
        x0, y0, _, _ = first
        for name, model in self.targets.items():
            for message in (check_randomness(model, x0), check_output_range(model, x0)):
                if message:
                    self.report.warn(f"{name}: {message}")
        for label, source, _ in self._sources():
            message = check_zero_gradients(source, x0, y0)
            if message:
                self.report.warn(f"{label}: {message}")
        for name, model in self.targets.items():
            began = time.perf_counter()
            parts = []
            for x, y, _, _ in self._batches(f"{name}: clean"):
                with torch.no_grad():
                    parts.append(model(x).argmax(dim=1) == y)
            self._clean[name] = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool, device=self.device)
            self.results[name] = ModelResult(name, self._clean[name].cpu())  # the copy waits for the device
            self.results[name].seconds["clean"] = time.perf_counter() - began
        return self.results

    def _attack(self, source: nn.Module, names: List[str], attack: Attack, epsilons: Sequence[float],
                desc: str) -> Tuple[Dict[str, Dict[float, torch.Tensor]], Dict[str, float]]:
        """Masks per target and ε for one run of ``attack`` (several ε only for a minimum-norm attack)."""
        masks = {n: {e: [] for e in epsilons} for n in names}
        outside = {n: torch.zeros((), dtype=torch.long, device=self.device) for n in names}
        craft, own = 0.0, {n: 0.0 for n in names}
        with forward_warnings(self.report, f"{attack.name} ({desc}): "):
            for x, y, part, k in self._batches(f"{desc}: {attack.name}"):
                # Every attack and batch sees the same random stream, whatever ran before it.
                seed_everything(self.seed + BATCH_SEED_STRIDE * k)
                # Whole batches, every one of the same size (cuDNN and torch.compile meet one shape):
                # an example the target already misclassifies counts as broken whatever the attack did.
                began = time.perf_counter()
                with self._resumable(attack, desc, k):
                    x_adv = attack(source, x, y)
                _sync(self.device)
                craft += time.perf_counter() - began
                for n in names:
                    began = time.perf_counter()
                    outcome = attack_outcome(self.targets[n], x, y, x_adv, attack)
                    clean = self._clean[n][part]
                    for e in epsilons:
                        masks[n][e].append(clean & ~outcome.broken(e))
                    if not attack.minimum_norm:
                        outside[n] += outcome.outside(attack.epsilon).sum()
                    _sync(self.device)
                    own[n] += time.perf_counter() - began
        outside = {n: int(count) for n, count in outside.items()}  # once per attack, not per batch
        for n in names:
            if outside[n]:
                self.report.warn(f"{n}: {attack.name}: {outside[n]} misclassified example(s) outside [0, 1] or "
                                 f"the {attack.budget} budget {attack.epsilon:.4g}; counted as not broken")
        for label, model in [(desc, source), *[(n, self.targets[n]) for n in names]]:
            message = check_eval_mode(model)
            if message:
                self.report.warn(f"{label}: after {attack.name}: {message}")
                model.eval()
        joined = {n: {e: torch.cat(m).cpu() if m else torch.zeros(0, dtype=torch.bool) for e, m in by_eps.items()}
                  for n, by_eps in masks.items()}
        # A transferred attack's crafting is shared: each target is charged all of it plus its own evaluation.
        return joined, {n: craft + own[n] for n in names}

    def _resumable(self, attack: Attack, label: str, batch: int):
        """AutoAttack's state file for this batch under ``aa_state`` (no state for other attacks)."""
        if self.aa_state is None or attack.name != "aa":
            return contextlib.nullcontext()
        # A readable folder per model, and a hash so that "a b" and "a_b" never share one.
        folder = re.sub(r"[^\w.-]+", "_", label) + "-" + hashlib.sha1(label.encode()).hexdigest()[:8]
        return resume_from(self.aa_state / folder / f"{attack.norm}-{attack.epsilon:.6g}" / f"batch{batch:05d}.pt")

    def run(self, attacks: Sequence[Attack], sweep_attacks: Sequence[Attack] = (),
            epsilons: Sequence[float] = ()) -> Dict[str, ModelResult]:
        """Table attacks, then the ε sweep; returns ``{target name: ModelResult}``."""
        if not self.results:
            self.prepare()
        epsilons = sorted(set(float(e) for e in epsilons))
        for label, source, names in self._sources():
            for attack in attacks:
                masks, seconds = self._attack(source, names, attack, [attack.epsilon], label)
                for n in names:
                    self.results[n].robust[attack.name] = masks[n][attack.epsilon]
                    self.results[n].seconds[attack.name] = seconds[n]
            for attack in sweep_attacks:
                self._sweep(label, source, names, attack, epsilons, attacks)
        if distributed.context().enabled:
            self._gather()
        return self.results

    def _gather(self) -> None:
        """Every process's masks in rank order (the whole split, once), the longest wall time, and
        every process's warnings, on every process."""
        parts = distributed.all_gather_object(
            ({n: (r.clean, r.robust, r.seconds, r.sweep, r.sweep_seconds) for n, r in self.results.items()},
             list(self.report.messages)))
        for name in self.results:
            shards = [part[0][name] for part in parts]
            result = ModelResult(name, torch.cat([s[0] for s in shards]))
            for attack in shards[0][1]:
                result.robust[attack] = torch.cat([s[1][attack] for s in shards])
            result.seconds = {k: max(s[2][k] for s in shards) for k in shards[0][2]}
            for attack, by_eps in shards[0][3].items():
                result.sweep[attack] = {e: torch.cat([s[3][attack][e] for s in shards]) for e in by_eps}
                result.sweep_seconds[attack] = {e: max(s[4][attack][e] for s in shards) for e in by_eps}
            self.results[name] = result
        for _, messages in parts:
            for message in messages:
                self.report.warn(message)

    def _sweep(self, label: str, source: nn.Module, names: List[str], attack: Attack,
               epsilons: Sequence[float], table_attacks: Sequence[Attack]) -> None:
        for n in names:
            self.results[n].sweep[attack.name] = {}
            self.results[n].sweep_seconds[attack.name] = {}

        def store(e: float, masks, seconds) -> None:
            for n in names:
                self.results[n].sweep[attack.name][e] = masks[n]
                self.results[n].sweep_seconds[attack.name][e] = seconds[n] if seconds else 0.0

        todo = []
        for e in epsilons:
            same = [a for a in table_attacks if a.name == attack.name and math.isclose(a.epsilon, e)]
            if e == 0:
                # No budget, nothing to attack: robust means correct.
                store(e, {n: self.results[n].clean.clone() for n in names}, None)
            elif same:
                store(e, {n: self.results[n].robust[attack.name] for n in names},
                      {n: self.results[n].seconds[attack.name] for n in names})
            else:
                todo.append(e)
        if not todo:
            return
        if attack.epsilon_free:
            # One run gives every budget: the attack ignores ε, only the counting uses it.
            masks, seconds = self._attack(source, names, attack, todo, label)
            for e in todo:
                store(e, {n: masks[n][e] for n in names}, seconds)
            return
        for e in todo:
            masks, seconds = self._attack(source, names, dataclasses.replace(attack, epsilon=e), [e], label)
            store(e, {n: masks[n][e] for n in names}, seconds)

    def trust_checks(self, attacks: Sequence[Attack]) -> None:
        for message in check_results(list(self.results.values()), attacks, self.transfer) + \
                check_sweep(list(self.results.values())):
            self.report.warn(message)
