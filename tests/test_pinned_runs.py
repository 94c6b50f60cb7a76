"""Short, seeded CPU runs of stages 1, 2 and 3 (NAMID, and NAMID with --release-compat) on
synthetic data, against the numbers they wrote when pinned (tests/data/pinned_runs.json): a
change to the code that changes what a stage computes fails here, whatever the refactoring.

The runs compute in float64 on one thread. In float32, a one-ulp difference between two CPUs'
kernels (AVX2 against AVX-512) flips the sign of a near-zero input gradient, PGD's sign step
amplifies it, and after a few epochs an accuracy differs by a whole image, which then changes
the model that stage 2 reads. In float64 such flips are out of reach, so counts are compared
exactly. Floats get a relative 1e-5: float64 reductions still differ in their last bits between
vector widths, and three epochs of training grow that to about 4e-7 (seen between AVX2 and
AVX-512); a real change of the loss moves them by far more.

Regenerate the file only for a change that is meant to change the numbers:
``python tests/test_pinned_runs.py``."""
import json
import math
import sys
from pathlib import Path

import torch

PINNED = Path(__file__).with_name("data") / "pinned_runs.json"
COMMON = ["--dataset", "synthetic", "--arch", "smallcnn", "--train-limit", "288", "--test-limit", "32",
          "--val-size", "32", "--epsilon", "0.1", "--num-steps", "2", "--eval-steps", "2", "--no-progress",
          "--seed", "3", "--device", "cpu"]
TIMES = ("seconds", "train_seconds")


def stage_runs(root: Path):
    """(name, script, argv) of each pinned stage, in the order they depend on each other."""
    train = ["--epochs", "3", "--warm-up-epochs", "2", "--batch-size", "32", "--lr", "0.05", "--lr-milestones", "3"]
    return [
        ("stage1", "train_standard", [*COMMON, *train, "--model-dir", root / "standard"]),
        ("stage2", "train_MI_estimator", [*COMMON, "--va-hsize", "16", "--epochs", "2", "--batch-size", "48",
                                          "--lr-milestones", "1", "--pre-target", root / "standard" / "best_model.pth",
                                          "--model-dir", root / "mi"]),
        ("stage3", "train_MIAT", [*COMMON, *train, "--va-hsize", "16", "--alpha", "0.5", "--mi-dir", root / "mi",
                                  "--model-dir", root / "namid"]),
        ("stage3_release", "train_MIAT", [*COMMON, *train, "--va-hsize", "16", "--alpha", "0.5", "--mi-dir",
                                          root / "mi", "--release-compat", "--model-dir", root / "namid_release"]),
    ]


def run_all(root: Path) -> dict:
    import importlib

    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # models, estimators and batches are built in float64
    try:
        out = {}
        for name, script, argv in stage_runs(root):
            importlib.import_module(script).main([str(a) for a in argv])
            folder = Path(argv[argv.index("--model-dir") + 1])
            lines = (folder / "metrics.jsonl").read_text().splitlines()
            out[name] = [{k: v for k, v in json.loads(line).items() if k not in TIMES} for line in lines]
        weights = torch.load(root / "namid" / "target_model.pth", weights_only=True)
        assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float64}
        return out
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)


def _same(expected, got, path=""):
    if isinstance(expected, dict):
        assert isinstance(got, dict) and set(expected) == set(got), (path, sorted(set(expected) ^ set(got)))
        for k in expected:
            _same(expected[k], got[k], f"{path}.{k}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(expected) == len(got), path
        for i, (e, g) in enumerate(zip(expected, got)):
            _same(e, g, f"{path}[{i}]")
    elif isinstance(expected, float) and isinstance(got, float):
        assert math.isclose(got, expected, rel_tol=1e-5, abs_tol=1e-9), (path, expected, got)
    else:
        assert got == expected, (path, expected, got)


def test_stages_compute_what_they_computed_when_pinned(tmp_path, capsys):
    got = run_all(tmp_path)
    capsys.readouterr()
    _same(json.loads(PINNED.read_text()), got)


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    with tempfile.TemporaryDirectory() as tmp:
        PINNED.write_text(json.dumps(run_all(Path(tmp)), indent=1) + "\n")
    print(f"wrote {PINNED}")
