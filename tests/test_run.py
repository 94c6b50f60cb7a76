"""utils/training/run.py: a run's start, end of epoch, resume and its refusals, and the Ctrl-C advice."""
import json

import pytest
import torch
import torch.nn as nn

from utils.cli import flags_of
from utils.script import UserError
from utils.training.run import Run


def make_run(folder, flags=None, **kw):
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[1])
    kw.setdefault("epochs", 3)
    return Run(folder, flags or {"lr": 0.1, "epochs": kw["epochs"]}, {"model": model}, optimizer, scheduler, **kw)


def test_fresh_start_writes_config_and_refuses_a_folder_with_a_run(tmp_path):
    run = make_run(tmp_path)
    assert run.start() == 1
    assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 0.1, "epochs": 3}
    run.end_epoch(1, {"pgd_acc": 10.0}, best={})
    with pytest.raises(UserError, match="--resume"):
        make_run(tmp_path).start()
    assert make_run(tmp_path, overwrite=True).start() == 1
    assert not (tmp_path / "last.pth").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_end_epoch_saves_the_best_files_only_when_the_score_improves(tmp_path):
    run = make_run(tmp_path, held_out=True)
    run.start()
    model = run.modules["model"]
    records = []
    for epoch, score in enumerate([5.0, 3.0, 7.0], 1):
        with torch.no_grad():
            model.weight.fill_(epoch)
        records.append(run.end_epoch(epoch, {"pgd_acc": score}, best={"best.pth": model}))
    assert [r["best"] for r in records] == [True, False, True]
    assert torch.load(tmp_path / "best.pth", weights_only=True)["weight"].eq(3).all()
    assert records[0]["evaluated_on"] == records[0]["selected_on"] == "val"
    assert [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_resume_restores_state_and_returns_the_next_epoch(tmp_path):
    run = make_run(tmp_path)
    run.start()
    run.optimizer.step()
    run.end_epoch(1, {"pgd_acc": 5.0}, best={})
    run.end_epoch(2, {"pgd_acc": 4.0}, best={})
    weights = run.modules["model"].weight.clone()
    resumed = make_run(tmp_path, resume=True)
    assert resumed.start() == 3
    assert torch.equal(resumed.modules["model"].weight, weights)
    assert resumed.best_score == 5.0
    assert resumed.optimizer.state_dict()["state"].keys() == run.optimizer.state_dict()["state"].keys()


def test_resume_refuses_a_changed_flag_and_another_scripts_run(tmp_path):
    run = make_run(tmp_path)
    run.start()
    run.end_epoch(1, {"pgd_acc": 5.0}, best={})
    with pytest.raises(UserError, match=r"--lr 0\.1 \(now 0\.2\)"):
        make_run(tmp_path, flags={"lr": 0.2, "epochs": 3}, resume=True).start()
    with pytest.raises(UserError, match="another script"):
        make_run(tmp_path, flags={"lr": 0.1, "epochs": 3, "beta": 6.0}, resume=True).start()
    # --epochs may change; a --release-* flag that the older run did not record counts as off.
    assert make_run(tmp_path, flags={"lr": 0.1, "epochs": 5, "release_passes": False}, resume=True,
                    epochs=5).start() == 2
    with pytest.raises(UserError, match="--release-passes"):
        make_run(tmp_path, flags={"lr": 0.1, "epochs": 5, "release_passes": True}, resume=True, epochs=5).start()
    # --tf32 (precision, like --amp) may change, and a run recorded before it existed resumes.
    assert make_run(tmp_path, flags={"lr": 0.1, "epochs": 5, "tf32": True}, resume=True, epochs=5).start() == 2


def test_stage_2_selects_by_epoch_number(tmp_path):
    run = make_run(tmp_path, select_by="epoch")
    run.start()
    records = [run.end_epoch(e, {"clean_acc": 50.0}, best={}) for e in (1, 2)]
    assert [r["best"] for r in records] == [True, True] and records[0]["selected_on"] == "last epoch"


def test_interrupted_advice_fits_what_the_run_kept(tmp_path):
    run = make_run(tmp_path)
    run.start()
    assert "run the same command again" in run.interrupted_advice()
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")
    assert "--overwrite" in run.interrupted_advice()
    run.end_epoch(1, {"pgd_acc": 1.0}, best={})
    assert "--resume" in run.interrupted_advice()


def test_flags_of_keeps_plain_values_only():
    from types import SimpleNamespace

    assert flags_of(SimpleNamespace(a=1, b="x", c=[1], d=None, quirks=object())) == {"a": 1, "b": "x", "c": [1],
                                                                                     "d": None}


def test_a_training_script_records_tf32_in_config_json(tmp_path, capsys):
    from tests.helpers import run_script

    argv = ["--dataset", "synthetic", "--arch", "smallcnn-nobn", "--train-limit", "32", "--test-limit", "16",
            "--batch-size", "16", "--epochs", "1", "--warm-up-epochs", "1", "--eval-steps", "1", "--no-progress"]
    for flag, value in (([], False), (["--tf32"], True)):
        folder = tmp_path / str(value)
        code, _, err = run_script(capsys, "train_standard", [*argv, *flag, "--model-dir", folder])
        assert code == 0, err
        assert json.loads((folder / "config.json").read_text())["tf32"] is value
