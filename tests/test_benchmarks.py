"""benchmarks/: the script runs and writes its JSON; the release reference does the work it claims;
gpu_session.sh rehearses on the CPU into one archive and refuses to start without CUDA.

No timing is asserted here: timings belong to benchmarks/benchmark.py's printed figures."""
import json
import os
import re
import subprocess
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
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


GPU_SESSION = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"
# The steps of the rehearsal (9_compile is left out under SMALL=1), each with its log in the archive.
REHEARSED_STEPS = ["0_wheels", "1_test_cuda", "2_benchmark", "3_data", "4_standard", "5_mi_estimator", "6_namid",
                   "7_options", "8_standard_fast"]
TRAINING_RUNS = ["standard", "mi_estimator", "namid", "standard_fast"]


def session_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("SMALL", "SKIP", "DEVICE", "DEADLINE", "WHEELS", "OUT")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def probe_wheel(folder: Path) -> str:
    """A minimal pure-Python wheel, so that the rehearsal installs something without a network."""
    name, dist = "gpu_session_probe", "gpu_session_probe-1.0.dist-info"
    files = {f"{name}.py": "VALUE = 1\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    folder.mkdir()
    with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)
        wheel.writestr(f"{dist}/RECORD", "".join(f"{path},,\n" for path in [*files, f"{dist}/RECORD"]))
    return name


def test_gpu_session_rehearsal_on_the_cpu_leaves_one_archive_and_a_summary(tmp_path):
    out = tmp_path / "out"
    probe = probe_wheel(tmp_path / "wheels")
    # No GPU even on a CUDA machine: the rehearsal checks the plumbing, and tests/test_cuda.py skips.
    env = session_env(SMALL="1", OUT=str(out), WHEELS=str(tmp_path / "wheels"), CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(["bash", str(GPU_SESSION)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    left = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(p.name for p in left) == ["gpu_session.tar.gz", "summary.txt"]  # the limit is 8
    archive = out / "gpu_session.tar.gz"
    assert archive.stat().st_size <= 16 * 2**20
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        read = {name: tar.extractfile(f"gpu_session/{name}").read().decode()
                for name in ("steps.txt", "env.txt", "test_cuda.xml", "1_test_cuda.log")}
        metrics = {run: tar.extractfile(f"gpu_session/{run}/metrics.jsonl").read().decode() for run in TRAINING_RUNS}
    assert not any(name.endswith(".pth") for name in names)  # checkpoints are not results
    for name in [*(f"{s}.log" for s in REHEARSED_STEPS), "env.txt", "steps.txt", "test_cuda.xml", "benchmark.json",
                 "benchmark.md", "options.json", "training_seconds.md"]:
        assert f"gpu_session/{name}" in names, name

    steps = read["steps.txt"]
    assert re.findall(r"^== (\S+) \(limit", steps, flags=re.M) == REHEARSED_STEPS
    assert re.findall(r"rc=(\d+)", steps) == ["0"] * len(REHEARSED_STEPS)  # every step did its work
    assert "== 9_compile skipped" in steps
    assert "--device cpu" in steps and "--device cuda" not in steps
    assert steps in (out / "summary.txt").read_text()

    env_text = read["env.txt"]
    assert "SMALL=1 rehearsal" in env_text and re.search(r"^python \S+ torch \S+", env_text, flags=re.M)
    assert re.search(rf"^installed from .*: .*\b{probe}\b", env_text, flags=re.M)  # the wheel went in first

    suite = ET.fromstring(read["test_cuda.xml"])
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests, skipped = int(suite.get("tests")), int(suite.get("skipped"))
    assert tests > 0 and int(suite.get("failures")) == int(suite.get("errors")) == 0
    assert skipped == tests and "needs a CUDA device" in read["1_test_cuda.log"]
    for run, text in metrics.items():
        assert [json.loads(line)["epoch"] for line in text.splitlines()] == [1], run


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script would run the whole session")
def test_gpu_session_without_cuda_stops_at_once_with_one_line(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(GPU_SESSION)], env=session_env(OUT=str(out)), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and "CUDA" in lines[0] and "SMALL=1" in lines[0], lines
    assert not out.exists()  # nothing was started
