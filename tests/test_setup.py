"""utils/training/setup.py: the shared setup of the training stages, and their models."""
import torch

from models import get_model
from utils.training.fast import FastPath
from utils.training.setup import DataSpec, DeviceSpec, SGDSpec, fresh_model, frozen_target, setup, sgd

CPU = DeviceSpec("cpu")


def data(**kw):
    return DataSpec(**{**dict(dataset="synthetic", data_dir="data", batch_size=16, seed=1, train_limit=64,
                              test_limit=32, val_size=None), **kw})


def test_setup_holds_out_the_default_and_reports_the_count(tmp_path):
    s = setup(tmp_path / "run", data(), CPU)
    assert s.held_out == 6  # a tenth of 64, so config.json records what was held out
    assert sum(len(y) for _, y in s.eval_loader) == 6 and sum(len(y) for _, y in s.train_loader) == 58
    x, _ = next(iter(s.train_loader))
    assert x.shape == (16, 3, 32, 32) and (tmp_path / "run").is_dir()
    assert setup(tmp_path / "run", data(val_size=0), CPU).held_out == 0


def test_setup_is_seeded(tmp_path):
    first = [y.tolist() for _, y in setup(tmp_path, data(), CPU).train_loader]
    again = [y.tolist() for _, y in setup(tmp_path, data(), CPU).train_loader]
    other = [y.tolist() for _, y in setup(tmp_path, data(seed=2), CPU).train_loader]
    assert first == again and first != other


def test_fresh_model_sgd_and_frozen_target(tmp_path):
    s = setup(tmp_path / "run", data(), CPU)
    model = fresh_model("smallcnn", s.info, s.device, FastPath(channels_last=True))
    assert model.block1[0].weight.is_contiguous(memory_format=torch.channels_last)
    optimizer, scheduler = sgd(model, SGDSpec(lr=0.1, momentum=0.9, weight_decay=2e-4, milestones=[2], gamma=0.1))
    assert optimizer.param_groups[0]["weight_decay"] == 2e-4 and scheduler.milestones == {2: 1}
    saved = get_model("smallcnn", 10, 3)
    torch.save(saved.state_dict(), tmp_path / "best_model.pth")
    target = frozen_target("smallcnn", tmp_path / "best_model.pth", s.info, s.device)
    assert not target.training and not any(p.requires_grad for p in target.parameters())
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), saved.state_dict().values()))


def test_setup_passes_tf32_to_the_device(tmp_path, monkeypatch):
    import utils.training.setup

    seen = []
    real = utils.training.setup.prepare_device
    monkeypatch.setattr(utils.training.setup, "prepare_device", lambda *a, **k: seen.append(k["tf32"]) or real(*a, **k))
    setup(tmp_path, data(), DeviceSpec("cpu", tf32=True))
    setup(tmp_path, data(), CPU)
    assert seen == [True, False]
