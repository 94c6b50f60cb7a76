"""Helpers shared by the tests: run a script's main in-process as a user would; tiny models,
data and results for the evaluation's tests; Markdown tables read back."""
import importlib
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.data.splits import Split
from utils.evaluation.results import ModelResult


def run_script(capsys, module_name: str, argv):
    """Run ``module.main`` through ``run_main``; return (exit code, stdout, stderr)."""
    from utils.script import run_main

    module = importlib.import_module(module_name)
    old = sys.argv
    sys.argv = [f"{module_name}.py", *map(str, argv)]
    code = 0
    try:
        run_main(lambda: module.main([str(a) for a in argv]))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(result, *fragments):
    code, _, err = result
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def spy_on_pgd(monkeypatch, module):
    """Record the named arguments of every attack that ``module`` (a training script) crafts."""
    import inspect

    real = module.pgd
    calls = []

    def spy(*a, **k):
        bound = inspect.signature(real).bind(*a, **k)
        bound.apply_defaults()
        calls.append({name: v for name, v in bound.arguments.items() if name not in ("model", "x", "y")})
        return real(*a, **k)

    monkeypatch.setattr(module, "pgd", spy)
    return calls


class Tiny(nn.Module):
    """A linear classifier on 3×8×8 images, with hooks for the pathologies the checks look for."""

    def __init__(self, kind: str = "plain"):
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(3 * 8 * 8, 10)

    def forward(self, x):
        if self.kind == "round":
            x = torch.round(x * 4)  # piecewise constant: zero gradient everywhere
        h = x.flatten(1)
        if self.kind == "noisy":
            h = F.dropout(h, 0.5, training=True)  # random even in eval mode
        out = self.fc(h)
        if self.kind == "softmax":
            out = out.softmax(dim=1)
        if self.kind == "self-training":
            self.train()  # a forward pass that flips the mode
        return out


def tiny_split(n: int = 16) -> Split:
    """``n`` random 3×8×8 images and labels, the same on every call."""
    g = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8),
                 torch.randint(0, 10, (n,), generator=g))

def model_result(clean, **robust):
    """A ModelResult called "m" from 0/1 lists: the clean mask and each attack's robust mask."""
    return ModelResult("m", torch.tensor(clean, dtype=torch.bool),
                          {k: torch.tensor(v, dtype=torch.bool) for k, v in robust.items()})


def markdown_tables(text):
    """Markdown tables of ``text`` as lists of {column: cell}."""
    tables, block = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            tables.append([dict(zip(block[0], row)) for row in block[2:]])
            block = []
    return tables


def save_estimators(estimators, model_dir) -> None:
    """The four estimator files of a stage-2 folder, written as train_MI_estimator.py writes them."""
    from utils.mi.estimators import estimator_best_files
    from utils.training.checkpoint import atomic_save

    for filename, module in estimator_best_files(estimators).items():
        atomic_save(module.state_dict(), Path(model_dir) / filename)
