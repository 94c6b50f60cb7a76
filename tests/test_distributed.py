"""The fast path and torchrun (utils/training.py, utils/distributed.py): same numbers, more speed."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train_standard
from models import get_model
from utils.attacks.pgd import pgd
from utils.training import FastPath, speed_up

ROOT = Path(__file__).resolve().parents[1]


def one_step_loss(fast: FastPath, flags: dict) -> float:
    """Loss of one Standard-AT training step (PGD-3, then the objective) from a fixed start."""
    torch.manual_seed(0)
    model = get_model("smallcnn", 10, 1)
    # TRADES' init zeroes the last layer, which would make every loss log(10): randomise it.
    torch.nn.init.normal_([m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].weight, std=0.3)
    x, y = torch.rand(16, 1, 28, 28), torch.arange(16) % 10
    model = speed_up(copy.deepcopy(model), SimpleNamespace(**flags))
    model.train()
    torch.manual_seed(1)
    xb = fast.batch(x)
    with fast.autocast(xb.device):
        x_adv = pgd(model, xb, y, 0.1, 0.025, 3, "linf")
        loss, _, _ = train_standard.standard_objective(model, xb, x_adv, y, SimpleNamespace(loss="ce", beta=6.0))
    loss.backward()
    return loss.item()


def test_channels_last_leaves_the_loss_unchanged():
    plain = one_step_loss(FastPath(), {})
    assert one_step_loss(FastPath(channels_last=True), {"channels_last": True}) == pytest.approx(plain, rel=1e-4)


def test_bf16_autocast_stays_within_tolerance():
    # bf16 keeps 8 bits of mantissa: a 2 % relative tolerance on the loss is the stated bound.
    plain = one_step_loss(FastPath(), {})
    assert one_step_loss(FastPath(amp=True), {}) == pytest.approx(plain, rel=2e-2)


def test_mi_scores_stay_fp32_under_autocast():
    from utils.mi import scores

    local, glob = torch.randn(4, 8, 5), torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u = scores(local, glob)
    assert u.dtype == torch.float32
    assert torch.allclose(u, torch.einsum("ih,jhl->ijl", glob, local), atol=1e-5)


def _run(cmd, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def _one_and_two_processes(worker: str, tmp_path, port: int):
    """What ``worker`` saved when run alone and under torchrun with 2 gloo processes."""
    single = _run([sys.executable, worker, str(tmp_path / "one.pt")])
    assert single.returncode == 0, single.stderr
    double = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                   worker, str(tmp_path / "two.pt")])
    assert double.returncode == 0, double.stderr[-2000:]
    return (torch.load(tmp_path / name, weights_only=True) for name in ("one.pt", "two.pt"))


def test_ddp_gradients_equal_single_process_gradients(tmp_path):
    """Two gloo processes, each on its shard of the global batch, average to the one-process gradient."""
    one, two = _one_and_two_processes("tests/ddp_worker.py", tmp_path, 29517)
    for key, grad in one.items():
        assert grad.abs().sum() > 0
        assert torch.allclose(two[key], grad, rtol=1e-4, atol=1e-6), key


def test_torchrun_training_run_writes_once_and_resumes(tmp_path):
    """train_standard.py under torchrun (2 gloo processes): completes, writes plain checkpoints from
    the first process only, resumes, and its clean training loss stays within 5 % of one process's
    (the BN-free SmallCNN draws its dropout masks per process, so the runs are not bit-identical)."""
    common = ["--dataset", "synthetic", "--arch", "smallcnn-nobn", "--train-limit", "128", "--test-limit", "64",
              "--batch-size", "16", "--warm-up-epochs", "1", "--num-steps", "1",
              "--eval-steps", "1", "--epsilon", "0.03", "--lr", "0.05", "--no-progress"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
                "train_standard.py", *common, "--model-dir", str(tmp_path / "two")]
    single = _run([sys.executable, "train_standard.py", *common, "--epochs", "2", "--model-dir", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr
    first = _run([*torchrun, "--epochs", "1"])
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = _run([*torchrun, "--epochs", "2", "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    one = [json.loads(ln) for ln in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(ln) for ln in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in two] == [1, 2]  # one line per epoch: only the first process logs
    assert two[0]["train_loss"] == pytest.approx(one[0]["train_loss"], rel=0.05)
    state = torch.load(tmp_path / "two" / "best_model.pth", weights_only=True)
    assert not any(k.startswith("module.") for k in state)


@pytest.mark.parametrize("script", ["train_MI_estimator.py", "train_MIAT.py"])
def test_torchrun_stage2_and_stage3(tmp_path, script):
    """The estimator and NAMID scripts run under torchrun (2 gloo processes) and write once."""
    from models.estimator import build_estimator
    from utils.estimators import save_estimators

    torch.manual_seed(0)
    torch.save(get_model("smallcnn", 10, 3).state_dict(), tmp_path / "target.pth")
    save_estimators({k: build_estimator(3, 10, 16) for k in ("natural", "adversarial")}, tmp_path / "mi")
    common = ["--dataset", "synthetic", "--arch", "smallcnn", "--train-limit", "64", "--test-limit", "32",
              "--batch-size", "32", "--epochs", "1", "--num-steps", "1", "--eval-steps", "1", "--va-hsize", "16",
              "--no-progress", "--model-dir", str(tmp_path / "out")]
    common += (["--pre-target", str(tmp_path / "target.pth")] if script == "train_MI_estimator.py"
               else ["--mi-dir", str(tmp_path / "mi")])
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29521",
                 script, *common])
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert 0 <= record["clean_acc"] <= 100
    if script == "train_MI_estimator.py":
        assert record["n_right"] + record["n_wrong"] <= 32  # summed over both shards of the 32 test images


def test_mi_terms_under_torchrun_equal_one_process(tmp_path):
    """Stages 2 and 3 gather the batch for their MI terms: two gloo processes give the one-process
    gradients of the NAMID objective (target) and of the estimator objective (estimators)."""
    one, two = _one_and_two_processes("tests/ddp_mi_worker.py", tmp_path, 29523)
    assert one["w_size"] == two["w_size"] > 0
    assert any(k.startswith("estimators.") for k in one) and any(k.startswith("target.") for k in one)
    for key, grad in one.items():
        if key != "w_size":
            assert grad.abs().sum() > 0, key
            assert torch.allclose(two[key], grad, rtol=1e-4, atol=1e-6), key
