"""utils/training/loop.py: the ε schedule, the meters, one epoch's pass, and the one epoch loop."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from utils.cli import fast_path
from utils.script import Interrupted
from utils.training import loop
from utils.training.fast import FastPath
from utils.training.loop import Meter, epsilon_at, fit, json_safe, target_steps
from utils.training.run import Run


def test_json_safe_turns_nan_into_null():
    assert json_safe({"a": float("nan"), "b": 1.5, "c": 3, "d": float("inf")}) == \
        {"a": None, "b": 1.5, "c": 3, "d": None}


def test_epsilon_schedule_warm_up_then_ramp_then_full():
    got = [epsilon_at(e, 0.3, warm_up_epochs=2, ramp_epochs=3) for e in range(1, 8)]
    assert got == pytest.approx([0.0, 0.0, 0.1, 0.2, 0.3, 0.3, 0.3])
    assert [epsilon_at(e, 0.3) for e in (1, 5)] == [0.3, 0.3]  # no warm-up, no ramp


def test_target_steps_scale_the_step_size_with_the_epoch_budget():
    seen = []
    steps_for = target_steps(nn.Linear(2, 2), lambda x, y, eps, step: seen.append((eps, step)),
                             epsilon=0.4, step_size=0.1, warm_up_epochs=1, ramp_epochs=2)
    clean, fields = steps_for(1)
    assert fields == {"train_epsilon": 0.0} and not seen
    loss, logits, extra = clean(torch.randn(3, 2), torch.tensor([0, 1, 0]))  # clean cross-entropy
    assert loss.ndim == 0 and logits.shape == (3, 2) and extra == {}
    for epoch in (2, 3):
        step, fields = steps_for(epoch)
        step(None, None)
        assert fields["train_epsilon"] == seen[-1][0]
    assert seen == [pytest.approx((0.2, 0.05)), pytest.approx((0.4, 0.1))]


def test_meter_means_are_weighted_by_counts():
    meter = Meter()
    meter.add("loss", torch.tensor(1.0), 3)
    meter.add("loss", torch.tensor(3.0), 1)
    meter.add("w", torch.tensor(5.0))
    assert meter.result() == {"loss": pytest.approx(1.5), "w": 5.0}
    assert Meter().result() == {}


def _toy_run(tmp_path, epochs=2, **kw):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[1], gamma=0.5)
    run = Run(tmp_path, {"epochs": epochs}, {"model": model}, optimizer, scheduler, epochs=epochs, **kw)
    loader = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1])) for _ in range(2)]
    return run, model, loader


def test_fit_trains_evaluates_steps_the_scheduler_and_writes_each_epoch(tmp_path):
    run, model, loader = _toy_run(tmp_path)
    calls, shown = [], []
    scores = iter([40.0, 30.0])

    def steps_for(epoch):
        calls.append(("epoch", epoch))
        return loop.cross_entropy_step(model), {"train_epsilon": 0.0}

    fit(run, run.start(), model, loader, steps_for, lambda: {"pgd_acc": next(scores)}, {"best.pth": model},
        progress=False, on_epoch=lambda e: calls.append(("start", e)), show=shown.append)
    assert calls == [("start", 1), ("epoch", 1), ("start", 2), ("epoch", 2)]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records] == [0.1, 0.05]  # the scheduler stepped after epoch 1
    assert [r["best"] for r in records] == [True, False] and [r["epoch"] for r in shown] == [1, 2]
    assert {"train_loss", "train_acc", "train_seconds", "seconds", "train_epsilon"} <= set(records[0])
    assert (tmp_path / "best.pth").is_file() and (tmp_path / "last.pth").is_file()


def test_fit_stops_before_committing_a_diverged_epoch(tmp_path):
    from utils.script import UserError

    run, model, loader = _toy_run(tmp_path)

    def steps_for(epoch):
        return (lambda x, y: (model(x).sum() * float("nan"), model(x), {})), {}

    with pytest.raises(UserError, match="diverged in epoch 1"):
        fit(run, run.start(), model, loader, steps_for, lambda: {"pgd_acc": 0.0}, {}, progress=False)
    assert not (tmp_path / "last.pth").exists()


def test_ctrl_c_in_fit_carries_the_runs_advice(tmp_path, monkeypatch):
    run, model, loader = _toy_run(tmp_path, epochs=3)

    def steps_for(epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return loop.cross_entropy_step(model), {}

    with pytest.raises(Interrupted, match="--resume"):
        fit(run, run.start(), model, loader, steps_for, lambda: {"pgd_acc": 1.0}, {}, progress=False)


def test_evaluate_counts_clean_and_robust_in_eval_mode():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    model.train()
    x = torch.rand(6, 1, 2, 2)
    with torch.no_grad():
        y = model(x).argmax(1)
    got = loop.evaluate(model, [(x, y)], epsilon=1e-6, step_size=1e-7, num_steps=1, norm="l_inf", progress=False)
    assert got == {"clean_acc": 100.0, "pgd_acc": 100.0}
    assert model.training  # its mode is restored


def test_fast_path_from_flags():
    args = SimpleNamespace(amp=True, channels_last=False, compile=True, compile_backend="aot_eager", sync_bn=False)
    assert fast_path(args) == FastPath(amp=True, compile=True, compile_backend="aot_eager")
    x = torch.rand(2, 3, 4, 4)
    assert FastPath(channels_last=True).batch(x).is_contiguous(memory_format=torch.channels_last)
