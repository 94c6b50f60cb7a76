"""Evaluate models already in memory (PAPER.md §7): what test_comparison.py does, from Python.

``evaluate(model, (x, y), "pgd40,aa")`` runs the same engine over the same batches with the same
seeds as the script, and returns the same per-model results (``ModelResult``: per-example masks)
and the same Markdown table. Images are in [0, 1] (uint8 0-255 also works); a model that expects
normalised inputs normalises them itself (``models.custom.Normalized``)."""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from utils.attacks.registry import Attack, build_attack, expand_attack_names
from utils.data.splits import Split
from utils.evaluation.engine import Evaluation
from utils.evaluation.output import results_json, results_table
from utils.evaluation.results import ModelResult, Report


@dataclass(eq=False)
class TensorSplit:
    """Float images in [0, 1] (N, C, H, W) and int64 labels, batched in order as they are."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device) -> "TensorSplit":
        return TensorSplit(self.images.to(device), self.labels.to(device))

    def subset(self, index: torch.Tensor) -> "TensorSplit":
        index = index.to(self.images.device)
        return TensorSplit(self.images[index], self.labels[index])

    def batches(self, batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self), batch_size):
            yield self.images[start:start + batch_size], self.labels[start:start + batch_size]


def as_split(data) -> Union[Split, TensorSplit]:
    """``(x, y)`` tensors, or an iterable of ``(x, y)`` batches (a DataLoader), held in memory."""
    if isinstance(data, (Split, TensorSplit)):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
    else:
        parts = [(bx, by) for bx, by in data]
        if not parts:
            raise ValueError("the data holds no batch")
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if x.dim() != 4 or y.shape != x.shape[:1]:
        raise ValueError(f"expected images (N, C, H, W) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    y = y.long()
    if x.dtype == torch.uint8:
        return Split(x, y)
    if not x.is_floating_point():
        raise ValueError(f"images must be floats in [0, 1] or uint8, got {x.dtype}")
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise ValueError("images must lie in [0, 1] (attacks clip to it): normalise inside the model instead, "
                         "e.g. models.custom.Normalized")
    return TensorSplit(x.to(torch.get_default_dtype()), y)


def build_attacks(names: Union[str, Sequence[str]], epsilon: Optional[float] = None, aa_version: str = "standard",
                  seed: int = 0) -> List[Attack]:
    """The attacks of ``names`` (registry names or groups, e.g. ``"pgd40,aa"``), as test_comparison.py builds them."""
    options = {"aa": {"version": aa_version, "seed": seed}}
    return [build_attack(n, epsilon=epsilon, **options.get(n, {})) for n in expand_attack_names(names)]


@dataclass
class Evaluated:
    """What :func:`evaluate` found: per-model results in order, the attacks, the warnings."""

    results: List[ModelResult]
    attacks: List[Attack]
    warnings: List[str] = field(default_factory=list)

    @property
    def table(self) -> str:
        """test_comparison.py's table: accuracy (%) per model, clean, each attack and the worst case."""
        return results_table(self.results, [a.name for a in self.attacks])

    def rows(self) -> Dict[str, Dict[str, float]]:
        return {r.name: r.table_row() for r in self.results}

    def json(self) -> dict:
        return results_json(self.results, self.attacks, {})


def run_evaluation(targets: Dict[str, nn.Module], split, attacks: Sequence[Attack], *, sweeps: Sequence[Attack] = (),
                   epsilons: Sequence[float] = (), batch_size: int = 256, device="cpu",
                   surrogate: Optional[nn.Module] = None, seed: int = 0, progress: bool = False,
                   report: Optional[Report] = None, aa_state: Optional[Path] = None) -> List[ModelResult]:
    """The engine over ``split`` for every target, then its trust checks; results in the targets' order."""
    engine = Evaluation(targets, split, batch_size=batch_size, device=device, surrogate=surrogate, seed=seed,
                        progress=progress, report=report, aa_state=aa_state)
    results = engine.run(attacks, sweeps, epsilons)
    engine.trust_checks(attacks)
    return [results[name] for name in targets]


def evaluate(models: Union[nn.Module, Dict[str, nn.Module]], data, attacks: Union[str, Sequence[str]] = "pgd40,aa",
             *, epsilon: Optional[float] = None, aa_version: str = "standard", batch_size: int = 256,
             device=None, seed: int = 0, surrogate: Optional[nn.Module] = None, progress: bool = False,
             aa_state: Optional[Path] = None, echo: bool = True) -> Evaluated:
    """Accuracy of ``models`` (one, or name → model) on ``data`` under ``attacks``, as test_comparison.py
    measures it (white-box, or transferred from ``surrogate``). ``device`` defaults to the first model's."""
    targets = {"model": models} if isinstance(models, nn.Module) else dict(models)
    if device is None:
        param = next(next(iter(targets.values())).parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    report = Report(echo=echo)
    built = build_attacks(attacks, epsilon, aa_version, seed)
    results = run_evaluation(targets, as_split(data), built, batch_size=batch_size, device=device,
                             surrogate=surrogate, seed=seed, progress=progress, report=report, aa_state=aa_state)
    return Evaluated(results, built, list(report.messages))
