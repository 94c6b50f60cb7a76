"""utils/training/checkpoint.py: atomic writes, the one safe checkpoint loader, and a run folder's files."""
import json
import pickle

import pytest
import torch
import torch.nn as nn

from utils.script import UserError
from utils.training.checkpoint import (
    atomic_write_text,
    load_checkpoint,
    load_weights,
    metrics_records,
    run_config,
    writable_dir,
)


class Payload:  # pickled by reference: loading it would need to run code
    pass


def test_load_checkpoint_refuses_code_folders_missing_and_damaged_files(tmp_path):
    torch.save({"w": torch.ones(1), "x": Payload()}, tmp_path / "code.pth")
    with pytest.raises(UserError, match="names code to run"):
        load_checkpoint(tmp_path / "code.pth", "--checkpoint")
    with pytest.raises(UserError, match="is a folder.*--model-dir"):
        load_checkpoint(tmp_path, "--checkpoint")
    with pytest.raises(UserError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "none.pth", "--resume")
    (tmp_path / "torn.pth").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(UserError, match="--resume"):
        load_checkpoint(tmp_path / "torn.pth", "--resume")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps(Payload(), protocol=2))
    with pytest.raises(UserError):
        load_checkpoint(tmp_path / "plain.pkl", "--resume")
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pth")
    assert torch.equal(load_checkpoint(tmp_path / "ok.pth", "--checkpoint")["w"], torch.ones(2))


def test_load_weights_strips_wrapper_prefixes_and_refuses_a_misfit(tmp_path):
    source = nn.Linear(2, 3)
    torch.save({f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}, tmp_path / "wrapped.pth")
    target = nn.Linear(2, 3)
    load_weights(target, tmp_path / "wrapped.pth", "--checkpoint", "a Linear(2, 3)")
    assert torch.equal(target.weight, source.weight)
    torch.save({"model": source.state_dict(), "epoch": 1}, tmp_path / "last.pth")  # a last.pth also serves
    load_weights(nn.Linear(2, 3), tmp_path / "last.pth", "--checkpoint", "a Linear(2, 3)")
    with pytest.raises(UserError, match="does not fit a Linear"):
        load_weights(nn.Linear(2, 4), tmp_path / "wrapped.pth", "--checkpoint", "a Linear(2, 4)")


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "config.json"
    atomic_write_text(path, "old")
    from utils.training.checkpoint import atomic_write

    def broken(f):
        f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken, binary=False)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_metrics_records_skip_a_torn_line_and_run_config_tolerates_garbage(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"epoch": 1, "a": 1}) + "\n" + json.dumps({"epoch": 2}) + "\n" + '{"epoch": 3, "a')
    assert [r["epoch"] for r in metrics_records(path)] == [1, 2]
    assert metrics_records(tmp_path / "none.jsonl") == []
    (tmp_path / "config.json").write_text("{not json")
    assert run_config(tmp_path) == {}
    (tmp_path / "config.json").write_text(json.dumps({"seed": 3}))
    assert run_config(tmp_path) == {"seed": 3}


def test_writable_dir_names_the_flag(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="--model-dir: cannot write"):
        writable_dir(blocker / "sub", "--model-dir")
    assert writable_dir(tmp_path / "new" / "dir", "--model-dir").is_dir()
