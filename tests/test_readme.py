"""README.md: its "NAMID in your own training loop" and "Evaluate your own model" blocks run as printed."""
import json
import re
from pathlib import Path

import torch

from models.estimator import build_estimator
from tests.helpers import save_estimators

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(heading: str) -> str:
    """The first ```python block after ``heading`` in README.md."""
    text = README.read_text()
    start = text.index(f"\n{heading}\n")
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert match, f"no python block under {heading!r}"
    return match.group(1)


def test_namid_in_your_own_loop_runs_verbatim(tmp_path, monkeypatch):
    code = readme_block("## NAMID in your own training loop")
    # What stage 2 would have left: the four estimator files and their config.json (a small H, for speed).
    mi_dir = tmp_path / "checkpoints" / "mi_estimator"
    torch.manual_seed(0)
    save_estimators({k: build_estimator(3, 10, 16) for k in ("natural", "adversarial")}, mi_dir)
    (mi_dir / "config.json").write_text(json.dumps({"va_hsize": 16, "is_internal": False, "is_internal_last": False}))
    monkeypatch.chdir(tmp_path)
    x, y = torch.rand(6, 3, 32, 32), torch.randint(0, 10, (6,))
    namespace = {"loader": [(x, y)]}
    exec(compile(code, "README.md", "exec"), namespace)
    model, est_n, terms = namespace["model"], namespace["est_n"], namespace["terms"]
    assert torch.isfinite(namespace["loss"]) and {"l_adv", "l_mi", "cos_nat", "cos_adv"} <= set(terms)
    assert all(p.grad is not None for p in model.parameters())  # the step trained θ
    assert not est_n.training and not any(p.requires_grad for p in est_n.parameters())


MYMODELS = """
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(8, num_classes))

    def forward(self, x):
        return self.body(x)
"""


def test_evaluate_your_own_model_runs_verbatim(tmp_path, monkeypatch):
    import utils.attacks.autoattack as aa

    code = readme_block("## Evaluate your own model")
    real_build = aa.build_autoattack

    def brief(*args, **kwargs):  # AutoAttack's four sub-attacks, briefly: the block, not AA, is under test
        adversary = real_build(*args, **kwargs)
        aa.set_iterations(adversary, 2)
        adversary.square.n_queries = 10
        return adversary

    monkeypatch.setattr(aa, "build_autoattack", brief)
    (tmp_path / "mymodels.py").write_text(MYMODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    torch.manual_seed(0)
    net = importlib.import_module("mymodels").Net(10)
    torch.nn.init.normal_(net.body[-1].weight, std=0.5)
    torch.save(net.state_dict(), tmp_path / "net.pth")
    x, y = torch.rand(12, 3, 16, 16), torch.randint(0, 10, (12,))
    namespace = {"loader": [(x[:8], y[:8]), (x[8:], y[8:])]}
    exec(compile(code, "README.md", "exec"), namespace)
    found = namespace["found"]
    assert found.table.splitlines()[0] == "| model | clean | pgd40 | aa | worst case |"
    (result,) = found.results
    assert result.clean.shape == namespace["robust"].shape == (12,)
    assert not (namespace["robust"] & ~result.clean).any()  # robust only where clean is right
    monkeypatch.delitem(__import__("sys").modules, "mymodels", raising=False)
