"""README.md: its "NAMID in your own training loop" block runs as printed."""
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
