"""utils/training/checkpoint.py: atomic writes, the one safe checkpoint loader, and a run folder's files."""
import argparse
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


@pytest.mark.parametrize("layout", ["state_dict", "model", "model_state_dict", "net", "nested", "module", "compiled"])
def test_load_weights_finds_the_state_dict_of_other_codebases(tmp_path, layout):
    """Nested under a key, beside numpy numbers, a numpy dtype and the run's Namespace; or prefixed."""
    import numpy as np

    source = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    nn.init.normal_(source[1].weight)
    weights = source.state_dict()
    extras = {"epoch": np.int64(7), "best_acc": np.float64(0.52), "dtype": np.dtype("float32"),
              "flag": np.bool_(True), "args": argparse.Namespace(lr=0.1, arch="mine"), "note": "text"}
    if layout == "nested":
        saved = {"checkpoint": 1, "model": {"state_dict": weights, "step": np.int32(3)}, **extras}
    elif layout in ("module", "compiled"):
        prefix = "module." if layout == "module" else "_orig_mod."
        saved = {"state_dict": {prefix + k: v for k, v in weights.items()}, **extras}
    else:
        saved = {layout: weights, "optimizer": {"state": {}, "param_groups": []}, **extras}
    torch.save(saved, tmp_path / "c.pth")
    target = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    load_weights(target, tmp_path / "c.pth", "--checkpoint", "a small net")
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), weights.values()))


def test_load_weights_maps_a_gpu_checkpoint_to_the_cpu(tmp_path, monkeypatch):
    """A file written on a GPU names its tensors' device: saved here with that device's tag, it
    would not load on a machine without one unless mapped."""
    source = nn.Linear(2, 3)
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save({"net": source.state_dict()}, tmp_path / "gpu.pth")
    assert b"cuda:0" in (tmp_path / "gpu.pth").read_bytes()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):  # what loading it unmapped does here
            torch.load(tmp_path / "gpu.pth", weights_only=True)
    target = nn.Linear(2, 3)
    load_weights(target, tmp_path / "gpu.pth", "--checkpoint", "a Linear(2, 3)")
    assert target.weight.device.type == "cpu" and torch.equal(target.weight, source.weight)


def test_a_checkpoint_holding_another_class_is_still_refused_in_one_line(tmp_path):
    torch.save({"state_dict": nn.Linear(2, 3).state_dict(), "extra": Payload()}, tmp_path / "code.pth")
    with pytest.raises(UserError) as err:
        load_weights(nn.Linear(2, 3), tmp_path / "code.pth", "--checkpoint", "a Linear(2, 3)")
    message = str(err.value)
    assert "\n" not in message and "Payload" in message and "refused" in message
    import numpy as np

    torch.save({"w": torch.ones(1), "a": np.array([1.0, 2.0])}, tmp_path / "array.pth")  # arrays are not allowed
    with pytest.raises(UserError, match="refused"):
        load_checkpoint(tmp_path / "array.pth", "--checkpoint")
    torch.save({"w": torch.ones(1), "a": np.array([1], dtype=object)[0:1].dtype}, tmp_path / "object.pth")
    with pytest.raises(UserError, match="refused"):
        load_checkpoint(tmp_path / "object.pth", "--checkpoint")


def test_a_misfit_names_the_first_missing_and_unexpected_keys_and_suggests_arch(tmp_path):
    saved = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3))
    torch.save(saved.state_dict(), tmp_path / "m.pth")
    torch.save(saved[:1].state_dict(), tmp_path / "first.pth")
    other = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3))
    with pytest.raises(UserError) as err:
        load_weights(other, tmp_path / "m.pth", "--checkpoint", "--arch mine", arch_flag="--surrogate-arch")
    message = str(err.value)
    assert "2 missing key(s) (1.weight, 1.bias)" in message
    assert "6 unexpected (2.weight, 2.bias, 3.weight, ...)" in message
    assert message.endswith("with --surrogate-arch") and "\n" not in message
    with pytest.raises(UserError, match=r"size mismatch.*with --arch$"):  # the keys fit, a shape does not
        load_weights(nn.Sequential(nn.Linear(2, 4)), tmp_path / "first.pth", "--checkpoint", "x")


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
