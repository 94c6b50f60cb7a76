"""Per-model evaluation results (PAPER.md §7): trust warnings and how they are collected, what an
adversarial batch did to each example, and each model's per-example robust masks.

Results are per-example masks (bool tensors, True = correct / still robust), so the worst case
over attacks is one AND."""
import logging
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from tqdm import tqdm

from utils.data.splits import Split

# ---------------------------------------------------------------- warnings


class Report:
    """Trust warnings: printed on stderr as they arise (AutoAttack's style), kept for the JSON."""

    def __init__(self, echo: bool = True):
        self.messages: List[str] = []
        self.echo = echo

    def warn(self, message: str) -> None:
        if message in self.messages:
            return
        self.messages.append(message)
        if self.echo:
            # tqdm.write keeps an open progress bar intact.
            tqdm.write(f"Warning: {message}", file=sys.stderr)


class _Forward(logging.Handler):
    def __init__(self, report: Report, prefix: str):
        super().__init__(level=logging.WARNING)
        self.report, self.prefix = report, prefix

    def emit(self, record):
        self.report.warn(f"{self.prefix}{record.getMessage()}")


@contextmanager
def forward_warnings(report: Report, prefix: str):
    """Route Python warnings and AutoAttack's logged warnings raised inside into ``report``."""
    logger = logging.getLogger("auto-attack")
    handler = _Forward(report, prefix)
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        logger.removeHandler(handler)
    for w in caught:
        if not issubclass(w.category, (DeprecationWarning, FutureWarning)):
            report.warn(f"{prefix}{w.message}")


# ---------------------------------------------------------------- per-example outcomes


def first_examples(split: Split, n: Optional[int]) -> Split:
    """The first ``n`` examples in order (all of them for None); never a random subset."""
    if n is None or n == len(split):
        return split
    return split.subset(torch.arange(n))


def accuracy(mask: torch.Tensor) -> float:
    """Percentage of True entries (0 for an empty mask)."""
    # From the integer count: a float32 mean would report 113/200 as 56.49999976158142.
    return 100.0 * int(mask.sum()) / mask.numel() if mask.numel() else 0.0


@dataclass
class ModelResult:
    """One model's per-example masks (True = correct / still robust) and wall times (s)."""

    name: str
    clean: torch.Tensor
    robust: Dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)
    sweep: Dict[str, Dict[float, torch.Tensor]] = field(default_factory=dict)
    sweep_seconds: Dict[str, Dict[float, float]] = field(default_factory=dict)

    @property
    def worst(self) -> torch.Tensor:
        """Robust to every attack run (the clean mask when none was)."""
        mask = self.clean.clone()
        for robust in self.robust.values():
            mask &= robust
        return mask

    def table_row(self) -> Dict[str, float]:
        """Accuracies (%): clean, each attack, worst case."""
        row = {"clean": accuracy(self.clean)}
        row.update({name: accuracy(mask) for name, mask in self.robust.items()})
        row["worst case"] = accuracy(self.worst)
        return row
