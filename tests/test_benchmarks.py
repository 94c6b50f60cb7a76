"""benchmarks/: the script runs and writes its JSON; the release reference does the work it claims.

No timing is asserted here: timings belong to benchmarks/benchmark.py's printed figures."""
import json
from types import SimpleNamespace

import torch
import torch.nn as nn

from benchmarks import benchmark
from benchmarks import release_reference as ref
from models.estimator import build_estimator
from utils.namid import freeze

HSIZE = 16
STEPS = 3


def cfg():
    return SimpleNamespace(**{**vars(benchmark.step_config(SimpleNamespace(pgd_steps=STEPS))),
                              "epsilon": 0.1, "step_size": 0.03})


def model_and_batch(n=8):
    model = benchmark.target("smallcnn", "cpu", seed=0)  # last layer re-initialised: predictions vary
    x = torch.rand(n, 1, 28, 28)
    y = torch.randint(0, 10, (n,))
    return model, x, y


def count_forwards(module):
    calls = []
    module.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_quick_run_writes_json_with_the_fields(tmp_path, capsys):
    out = tmp_path / "bench.json"
    benchmark.main(["--quick", "--only", "train-step", "--iters", "1", "--warmup", "0", "--batch-size", "4",
                    "--arch", "smallcnn", "--device", "cpu", "--pgd-steps", "2", "--ref-workers", "0",
                    "--out", str(out)])
    record = json.loads(out.read_text())
    assert out.with_suffix(".md").exists()
    assert record["device_type"] == "cpu" and record["device"]
    results = record["results"]
    assert {r["impl"] for r in results} == {"ours", "reference"}
    for r in results:
        assert r["case"] == "train-step" and r["arch"] == "smallcnn" and r["input"] == "1x28x28"
        assert r["batch"] == 4 and r["dtype"] == "float32"
        assert r["images_per_s"] > 0 and r["epoch_seconds"] > 0 and r["epoch_images"] == 60_000
    assert set(record["summary"]["train-step/smallcnn"]) == {"ours_images_per_s", "reference_images_per_s",
                                                            "ours_over_reference"}
    printed = capsys.readouterr().out
    assert "ours / reference" in printed and "img/s" in printed


def test_default_out_is_named_after_the_device():
    assert benchmark.default_out(torch.device("cpu")).name == "cpu.json"


def test_reference_namid_runs_the_target_seven_times_ours_twice():
    model, x, y = model_and_batch()
    est_n, est_a = (freeze(build_estimator(1, 10, HSIZE)) for _ in range(2))
    calls = count_forwards(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    ref.namid_step(model, est_n, est_a, optimizer, x, y, cfg())
    assert len(calls) == STEPS + 7 == STEPS + len(ref.NAMID_PASSES)

    calls.clear()
    model.train()
    loss, _, _ = benchmark.ours_namid_step(model, est_n, est_a, cfg())(x, y)
    loss.backward()
    assert len(calls) == STEPS + 2


def test_reference_estimator_step_runs_the_target_six_times_ours_twice():
    model, x, y = model_and_batch()
    model.eval()
    ests = nn.ModuleDict({k: build_estimator(1, 10, HSIZE) for k in ("natural", "adversarial")})
    optimizers = tuple(torch.optim.Adam(e.parameters(), lr=0.0) for e in ests.values())
    calls = count_forwards(model)
    locals_ = count_forwards(ests["natural"].local)
    ref.estimator_step(model, ests["natural"], ests["adversarial"], optimizers, x, y, cfg())
    assert len(calls) == STEPS + 6 and len(locals_) == 2

    calls.clear()
    locals_.clear()
    model.requires_grad_(False)
    loss, _, _ = benchmark.ours_estimator_step(model, ests, cfg())(x, y)
    loss.backward()
    assert len(calls) == STEPS + 2 and len(locals_) == 1


def test_reference_attack_is_the_releases_lean_loop_and_stays_in_the_ball():
    """The release's L∞ attacks take the input gradient only (like ours): a reference that also
    back-propagated into the parameters would flatter our speed-up."""
    model, x, y = model_and_batch()
    seen, calls = [], []
    for p in model.parameters():
        p.register_hook(lambda g: seen.append(1))
    model.register_forward_hook(lambda *a: calls.append(1))
    x_adv = ref.release_pgd(model, x, y, 0.1, 0.03, STEPS)
    assert not seen and all(p.grad is None for p in model.parameters())
    assert len(calls) == STEPS  # one forward per step, as ours
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() > 0.1 - 0.03  # it did move, by sign steps of 0.03


def test_release_loader_serves_augmented_float_batches():
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(6)
    x, y = next(iter(ref.release_loader(images, labels, batch_size=4, workers=0)))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.dtype == torch.int64 and y.shape == (4,)


def test_ddp_cpu_times_one_process_and_torchrun(tmp_path, capsys):
    from benchmarks import ddp_cpu

    out = tmp_path / "ddp.json"
    ddp_cpu.main(["--nproc", "2", "--steps", "1", "--warmup", "1", "--batch-size", "4", "--out", str(out)])
    runs = json.loads(out.read_text())["runs"]
    assert [r["processes"] for r in runs.values()] == [1, 1, 2]
    assert [r["threads_per_process"] for r in runs.values()] == [1, 2, 1]
    assert all(r["images_per_second"] > 0 for r in runs.values())
    assert "2 processes (DDP)" in capsys.readouterr().out


def test_options_mode_times_ours_against_the_baseline(tmp_path, capsys):
    out = tmp_path / "options.json"
    benchmark.main(["--options", "channels_last", "--only", "train-step", "--arch", "smallcnn", "--iters", "1",
                    "--warmup", "1", "--batch-size", "4", "--device", "cpu", "--pgd-steps", "2", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["device"] and "results" not in record
    rows = {r["option"]: r for r in record["options"]}
    assert list(rows) == ["baseline", "channels_last"] and len(record["options"]) == 2
    assert all(r["impl"] == "ours" and r["case"] == "train-step" and r["arch"] == "smallcnn" for r in rows.values())
    assert all(r["images_per_s"] > 0 for r in rows.values())
    base, nhwc = rows["baseline"], rows["channels_last"]
    assert base["x_baseline"] == 1.0
    assert nhwc["x_baseline"] == nhwc["images_per_s"] / base["images_per_s"]
    assert "fast path: channels_last" in nhwc["notes"] and "fast path" not in base["notes"]
    assert "× baseline" in capsys.readouterr().out


def test_balance_cost_prints_and_writes_its_figures(tmp_path, capsys):
    from benchmarks import balance_cost

    out = tmp_path / "cost.json"
    figures = balance_cost.main(["--batch-size", "4", "--pgd-steps", "1", "--va-hsize", "8", "--repeats", "1",
                                 "--steps", "1", "--epoch-batches", "10", "--balance-batches", "2",
                                 "--out", str(out)])
    assert set(figures["step_seconds"]) == {"plain", "measured", "capped"}
    assert all(v > 0 for v in figures["step_seconds"].values())
    assert json.loads(out.read_text())["cap_overhead"] == figures["cap_overhead"]
    assert "of an epoch" in capsys.readouterr().out
