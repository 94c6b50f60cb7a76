"""The fast path and torchrun (utils/training/: loop.py, setup.py, distributed.py): same numbers, more speed."""
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
from utils.attacks.base import bare_module
from utils.attacks.pgd import pgd
from utils.training.fast import FastPath
from utils.training.setup import compiled, speed_up

ROOT = Path(__file__).resolve().parents[1]


def one_step_loss(fast: FastPath, flags: dict):
    """Loss of one Standard-AT training step (PGD-3, then the objective) from a fixed start, and what
    the model saw: the inputs of its forward passes, the logits it returned and its conv weights."""
    torch.manual_seed(0)
    model = get_model("smallcnn", 10, 3)
    # TRADES' init zeroes the last layer, which would make every loss log(10): randomise it.
    torch.nn.init.normal_([m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].weight, std=0.3)
    x, y = torch.rand(16, 3, 32, 32), torch.arange(16) % 10  # 3 channels: NCHW and NHWC strides differ
    model = speed_up(copy.deepcopy(model), FastPath(**flags))
    model.train()
    seen = SimpleNamespace(inputs=[], logits=[])
    model.register_forward_pre_hook(lambda m, args: seen.inputs.append(args[0]))
    model.register_forward_hook(lambda m, args, out: seen.logits.append(out))
    seen.conv_weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    torch.manual_seed(1)
    xb = fast.batch(x)
    seen.batch = xb
    with fast.autocast(xb.device):
        x_adv = pgd(model, xb, y, 0.1, 0.025, 3, "linf")
        loss, _, _ = train_standard.standard_objective(model, xb, x_adv, y, SimpleNamespace(loss="ce", beta=6.0))
    loss.backward()
    assert len(seen.inputs) == len(seen.logits) >= 2  # the attack's passes, then the objective's on x̃
    return loss.item(), seen


def channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def test_compiled_leaves_room_for_every_graph_of_a_run(monkeypatch):
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    monkeypatch.setattr(config, name, 8)  # Dynamo's default; a TRADES NAMID run needs 7 graphs
    model = torch.nn.Linear(2, 2)
    wrapped = compiled(model)
    assert getattr(config, name) >= 32
    assert wrapped is not model and bare_module(wrapped) is model
    monkeypatch.setattr(config, name, 64)
    compiled(model)
    assert getattr(config, name) == 64  # a larger limit set by the user is kept


def test_channels_last_leaves_the_loss_unchanged():
    plain, seen = one_step_loss(FastPath(), {})
    assert not any(channels_last(t) for t in [seen.batch, *seen.inputs, *seen.conv_weights])
    fast, seen = one_step_loss(FastPath(channels_last=True), {"channels_last": True})
    assert fast == pytest.approx(plain, rel=1e-4)
    # The fast path really ran NHWC: the batch, every input the model was given and its conv weights.
    assert channels_last(seen.batch)
    assert all(channels_last(t) for t in seen.inputs)
    assert len(seen.conv_weights) == 4 and all(channels_last(w) for w in seen.conv_weights)


def test_bf16_autocast_stays_within_tolerance():
    # bf16 keeps 8 bits of mantissa: a 2 % relative tolerance on the loss is the stated bound.
    plain, seen = one_step_loss(FastPath(), {})
    assert all(t.dtype == torch.float32 for t in seen.logits)
    amp, seen = one_step_loss(FastPath(amp=True), {})
    assert all(t.dtype == torch.bfloat16 for t in seen.logits)  # the forward passes ran in bf16
    assert amp != plain  # so the loss is not fp32's to the bit ...
    assert amp == pytest.approx(plain, rel=2e-2)  # ... but within the bound


def test_mi_scores_stay_fp32_under_autocast():
    from utils.mi.bounds import scores

    local, glob = torch.randn(4, 8, 5), torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u = scores(local, glob)
    assert u.dtype == torch.float32
    assert torch.allclose(u, torch.einsum("ih,jhl->ijl", glob, local), atol=1e-5)


def _run(cmd, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


# --standalone: torchrun picks a free port, so parallel test runs never collide on a fixed one.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _one_and_two_processes(worker: str, tmp_path):
    """What ``worker`` saved when run alone and under torchrun with 2 gloo processes."""
    single = _run([sys.executable, worker, str(tmp_path / "one.pt")])
    assert single.returncode == 0, single.stderr
    double = _run([*TORCHRUN, worker, str(tmp_path / "two.pt")])
    assert double.returncode == 0, double.stderr[-2000:]
    return (torch.load(tmp_path / name, weights_only=True) for name in ("one.pt", "two.pt"))


def test_ddp_gradients_equal_single_process_gradients(tmp_path):
    """Two gloo processes, each on its shard of the global batch, average to the one-process gradient."""
    one, two = _one_and_two_processes("tests/ddp_worker.py", tmp_path)
    for key, grad in one.items():
        assert grad.abs().sum() > 0
        assert torch.allclose(two[key], grad, rtol=1e-4, atol=1e-6), key


def test_torchrun_training_run_writes_once_and_resumes(tmp_path):
    """train_standard.py under torchrun (2 gloo processes): completes, writes plain checkpoints from
    the first process only, and its clean training loss stays within 5 % of one process's (the
    BN-free SmallCNN draws its dropout masks per process, so the runs are not bit-identical). A
    resumed run ends with the weights of an uninterrupted one: each process gets back its own RNG
    state, and the two processes' states differ (each draws its own attack noise)."""
    common = ["--dataset", "synthetic", "--arch", "smallcnn-nobn", "--train-limit", "128", "--test-limit", "64",
              "--batch-size", "16", "--warm-up-epochs", "1", "--num-steps", "1",
              "--eval-steps", "1", "--epsilon", "0.03", "--lr", "0.05", "--no-progress"]
    torchrun = [*TORCHRUN, "train_standard.py", *common, "--model-dir", str(tmp_path / "two")]
    single = _run([sys.executable, "train_standard.py", *common, "--epochs", "2", "--model-dir", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr
    first = _run([*torchrun, "--epochs", "1"])
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = _run([*torchrun, "--epochs", "2", "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = _run([*TORCHRUN, "train_standard.py", *common, "--epochs", "2",
                     "--model-dir", str(tmp_path / "straight")])
    assert straight.returncode == 0, straight.stderr[-2000:]
    after_resume = torch.load(tmp_path / "two" / "last.pth", weights_only=True)
    uninterrupted = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)
    for key, value in uninterrupted["model"].items():
        assert torch.equal(after_resume["model"][key], value), key
    first_ranks = uninterrupted["rng_ranks"]
    assert len(first_ranks) == 2 and not torch.equal(first_ranks[0]["torch"], first_ranks[1]["torch"])
    one = [json.loads(ln) for ln in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(ln) for ln in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in two] == [1, 2]  # one line per epoch: only the first process logs
    assert two[0]["train_loss"] == pytest.approx(one[0]["train_loss"], rel=0.05)
    state = torch.load(tmp_path / "two" / "best_model.pth", weights_only=True)
    assert not any(k.startswith("module.") for k in state)


def _briefly_trained_target(path, test_split) -> torch.Tensor:
    """Save a SmallCNN trained for 16 clean steps on synthetic data, so that both halves of the
    evaluation split hold correctly classified images; return its clean hits on ``test_split``."""
    from utils.data.loaders import load_splits

    train = load_splits("synthetic", "data", train_limit=256, test_limit=1, val_size=0, seed=0)[0]["train"]
    torch.manual_seed(0)
    model = get_model("smallcnn", 10, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = train.images.float() / 255, train.labels
    for i in range(0, 256, 16):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i:i + 16]), y[i:i + 16]).backward()
        optimizer.step()
    torch.save(model.state_dict(), path)
    with torch.no_grad():
        return model.eval()(test_split.images.float() / 255).argmax(1) == test_split.labels


@pytest.mark.parametrize("script,extra", [("train_MI_estimator.py", []), ("train_MIAT.py", []),
                                          ("train_MIAT.py", ["--release-compat"])])
def test_torchrun_stage2_and_stage3(tmp_path, script, extra):
    """The estimator and NAMID scripts run under torchrun (2 gloo processes) and write once. Stage 2's
    target is frozen, so its clean evaluation, split over the two processes, must give one process's
    counts exactly: every test image counted once (sharded), and the Fig. 4 table summed over both."""
    from models.estimator import build_estimator
    from tests.helpers import save_estimators
    from utils.data.loaders import load_splits

    common = ["--dataset", "synthetic", "--arch", "smallcnn", "--train-limit", "64", "--test-limit", "32",
              "--batch-size", "32", "--epochs", "1", "--num-steps", "1", "--eval-steps", "1", "--va-hsize", "16",
              "--no-progress", *extra]
    if script == "train_MI_estimator.py":
        test_split = load_splits("synthetic", "data", train_limit=64, test_limit=32, val_size=0, seed=0)[0]["test"]
        hits = _briefly_trained_target(tmp_path / "target.pth", test_split)
        # Both processes' shards (every other image) hold hits: a sum missing over processes would show.
        assert 0 < int(hits[0::2].sum()) < int(hits.sum())
        common += ["--pre-target", str(tmp_path / "target.pth")]
    else:
        torch.manual_seed(0)
        save_estimators({k: build_estimator(3, 10, 16) for k in ("natural", "adversarial")}, tmp_path / "mi")
        common += ["--mi-dir", str(tmp_path / "mi")]
    proc = _run([*TORCHRUN, script, *common, "--model-dir", str(tmp_path / "out")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert 0 <= record["clean_acc"] <= 100
    if script != "train_MI_estimator.py":
        # The gradient balance, measured through DDP on the batches with a non-empty W.
        assert record["balance_batches"] >= 0
        assert record["grad_adv"] > 0 if record["balance_batches"] else record["grad_adv"] is None
        return
    import train_MI_estimator

    train_MI_estimator.main([*common, "--model-dir", str(tmp_path / "one")])
    (single,) = [json.loads(ln) for ln in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert single["clean_acc"] == pytest.approx(100 * float(hits.float().mean()))
    assert record["clean_acc"] == pytest.approx(single["clean_acc"])
    # R ∪ W = C, the clean hits (x̃ depends on each process's random PGD start; C does not).
    assert record["n_right"] + record["n_wrong"] == single["n_right"] + single["n_wrong"] == int(hits.sum())
    assert record["n_right"] + record["n_wrong"] == round(record["clean_acc"] * 32 / 100)


def test_mi_terms_under_torchrun_equal_one_process(tmp_path):
    """Stages 2 and 3 gather the batch for their MI terms: two gloo processes give the one-process
    gradients of the NAMID objective (target) and of the estimator objective (estimators), in
    float64, so that only the order of the sums differs."""
    one, two = _one_and_two_processes("tests/ddp_mi_worker.py", tmp_path)
    assert one["w_size"] == two["w_size"] > 0
    assert any(k.startswith("estimators.") for k in one) and any(k.startswith("target.") for k in one)
    for key, grad in one.items():
        if key != "w_size":
            assert grad.abs().sum() > 0, key
            assert two[key].dtype == torch.float64, key
            assert torch.allclose(two[key], grad, rtol=1e-9, atol=1e-12), key


def test_gather_batch_on_uneven_shards_with_a_bool_mask(tmp_path):
    """Rank 0 holds rows 0-2, rank 1 rows 3-4: both see all five rows in rank order, the mask
    stays bool, and each rank's gradient is its own rows' share of the common loss, summed over
    the two processes that computed it (DDP's averaging halves it back). Equal shards, as the
    training loader gives, gather the same way without being told the sizes, and without a host sync."""
    proc = _run([*TORCHRUN, "tests/ddp_gather_worker.py", str(tmp_path / "g")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = torch.cat([torch.arange(6.0).view(3, 2), torch.arange(4.0).view(2, 2) + 30])
    weights = torch.arange(10.0).view(5, 2)
    for rank, rows in ((0, slice(0, 3)), (1, slice(3, 5))):
        got = torch.load(tmp_path / f"g.{rank}.pt", weights_only=True)
        assert torch.equal(got["values"], expected)
        assert got["mask"].dtype == torch.bool and got["mask"].tolist() == [True, False, True, False, True]
        assert torch.equal(got["grad"], 2 * weights[rows])
        # Equal shards need no sizes: the gather and its backward read nothing back to the host.
        assert torch.equal(got["even"], torch.tensor([0.0, 0, 0, 0, 1, 1, 1, 1]).view(4, 2))
        assert got["even_mask"].tolist() == [False, False, True, True]
        assert torch.equal(got["even_grad"], 2 * torch.arange(8.0).view(4, 2)[2 * rank: 2 * rank + 2])
        assert got["syncs"] == 0


def test_average_gradients_in_buckets_equals_one_all_reduce_per_parameter(tmp_path):
    """Two gloo processes: the bucketed average is the per-parameter one (a missing gradient counts
    as zero, frozen parameters are left alone, an NHWC gradient keeps its layout), with one
    all_reduce per bucket, fewer than the parameters."""
    proc = _run([*TORCHRUN, "tests/ddp_average_worker.py", str(tmp_path / "a")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [torch.load(tmp_path / f"a.{rank}.pt", weights_only=True) for rank in (0, 1)]
    for got in results:
        assert got["bucketed"].keys() == got["reference"].keys() and len(got["reference"]) == 6
        for name, grad in got["reference"].items():
            assert got["bucketed"][name].dtype == grad.dtype
            assert torch.equal(got["bucketed"][name], grad), name  # the same sums, so the same bits
        assert torch.equal(got["bucketed"]["1.bias"], torch.zeros(30))
        assert got["frozen_grad"] == [None, None]
        assert got["channels_last"]
        assert len(got["calls"]) == got["buckets"] < got["parameters"]
        assert sum(got["calls"]) == sum(g.numel() for g in got["reference"].values())
    assert torch.equal(results[0]["bucketed"]["0.weight"], results[1]["bucketed"]["0.weight"])


def test_buckets_group_consecutive_tensors_of_one_dtype_within_the_limit():
    from utils.training.distributed import buckets

    f32 = [torch.zeros(n) for n in (10, 10, 30, 5)]  # 40, 40, 120, 20 bytes
    f64 = torch.zeros(2, dtype=torch.float64)
    groups = buckets([*f32[:3], f64, f32[3]], limit=100)
    assert [[t.numel() for t in g] for g in groups] == [[10, 10], [30], [2], [5]]
    assert buckets([], limit=100) == []
    assert len(buckets(f32, limit=10**9)) == 1


def test_init_binds_the_process_group_to_this_gpu(monkeypatch):
    """On CUDA, init_process_group gets device_id = this process's GPU where PyTorch takes it (≥ 2.3)."""
    from utils.training import distributed

    calls = []
    monkeypatch.setattr(distributed, "_CONTEXT", distributed.Context())  # restored afterwards
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)

    def init_process_group(backend, device_id=None):
        calls.append((backend, device_id))

    monkeypatch.setattr(distributed.dist, "init_process_group", init_process_group)
    assert distributed.init("auto") == distributed.Context(1, 2, 1)
    assert calls == [("set_device", 1), ("nccl", torch.device("cuda", 1))]

    def old_init_process_group(backend):  # PyTorch < 2.3 has no device_id
        calls.append((backend,))

    calls.clear()
    monkeypatch.setattr(distributed.dist, "init_process_group", old_init_process_group)
    distributed.init("auto")
    assert calls == [("set_device", 1), ("nccl",)]
    calls.clear()
    distributed.init("cpu")  # gloo on CPU: no GPU to bind
    assert calls == [("gloo",)]


@pytest.mark.parametrize("saved_ranks", [2, None])  # another process count; a last.pth without per-process states
def test_resume_under_another_process_count_gives_each_process_its_own_noise(monkeypatch, tmp_path, saved_ranks):
    from utils.training import distributed
    from utils.training.device import rng_state
    from utils.training.run import Run

    torch.manual_seed(0)
    first = rng_state()
    ckpt = {"rng": first, "epoch": 3}
    if saved_ranks:
        ckpt["rng_ranks"] = [first] * saved_ranks
    draws = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "_CONTEXT", distributed.Context(rank=rank, world_size=3))
        Run(tmp_path, {}, {}, None, None, epochs=3, seed=0)._restore_rng(ckpt)
        draws.append(torch.rand(4))
    torch.manual_seed(0)
    assert torch.equal(draws[0], torch.rand(4))  # the first process continues the saved stream
    assert not torch.equal(draws[1], draws[0]) and not torch.equal(draws[2], draws[1])


def test_resume_under_the_same_process_count_restores_each_process_its_state(monkeypatch, tmp_path):
    from utils.training import distributed
    from utils.training.device import rng_state
    from utils.training.run import Run

    states = []
    for seed in (10, 11):
        torch.manual_seed(seed)
        states.append(rng_state())
    monkeypatch.setattr(distributed, "_CONTEXT", distributed.Context(rank=1, world_size=2))
    ckpt = {"rng": states[0], "rng_ranks": states, "epoch": 1}
    Run(tmp_path, {}, {}, None, None, epochs=3, seed=0)._restore_rng(ckpt)
    got = torch.rand(4)
    torch.manual_seed(11)
    assert torch.equal(got, torch.rand(4))
