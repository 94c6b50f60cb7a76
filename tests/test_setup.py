"""utils/training/setup.py: the shared setup of the training stages, and their models."""
from types import SimpleNamespace

import torch

from models import get_model
from utils.training.setup import fresh_model, frozen_target, setup, sgd


def flags(tmp_path, **kw):
    base = dict(model_dir=str(tmp_path / "run"), device="cpu", batch_size=16, no_cudnn_benchmark=False, seed=1,
                dataset="synthetic", data_dir="data", train_limit=64, test_limit=32, val_size=None, arch="smallcnn",
                channels_last=False, sync_bn=False, compile=False, compile_backend="inductor", tf32=False, lr=0.1,
                momentum=0.9, weight_decay=2e-4,
                lr_milestones=[2], lr_gamma=0.1)
    base.update(kw)
    return SimpleNamespace(**base)


def test_setup_holds_out_the_default_and_records_the_count(tmp_path):
    args = flags(tmp_path)
    s = setup(args)
    assert args.val_size == 6  # a tenth of 64, so config.json records what was held out
    assert sum(len(y) for _, y in s.eval_loader) == 6 and sum(len(y) for _, y in s.train_loader) == 58
    x, _ = next(iter(s.train_loader))
    assert x.shape == (16, 3, 32, 32) and (tmp_path / "run").is_dir()


def test_setup_is_seeded(tmp_path):
    first = [y.tolist() for _, y in setup(flags(tmp_path)).train_loader]
    again = [y.tolist() for _, y in setup(flags(tmp_path)).train_loader]
    other = [y.tolist() for _, y in setup(flags(tmp_path, seed=2)).train_loader]
    assert first == again and first != other


def test_fresh_model_sgd_and_frozen_target(tmp_path):
    args = flags(tmp_path, channels_last=True)
    s = setup(args)
    model = fresh_model(args, s.info, s.device)
    assert model.block1[0].weight.is_contiguous(memory_format=torch.channels_last)
    optimizer, scheduler = sgd(model, args)
    assert optimizer.param_groups[0]["weight_decay"] == 2e-4 and scheduler.milestones == {2: 1}
    saved = get_model("smallcnn", 10, 3)
    torch.save(saved.state_dict(), tmp_path / "best_model.pth")
    target = frozen_target(flags(tmp_path, pre_target=tmp_path / "best_model.pth"), s.info, s.device)
    assert not target.training and not any(p.requires_grad for p in target.parameters())
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), saved.state_dict().values()))


def test_setup_passes_tf32_to_the_device(tmp_path, monkeypatch):
    import utils.training.setup

    seen = []
    real = utils.training.setup.prepare_device
    monkeypatch.setattr(utils.training.setup, "prepare_device", lambda *a, **k: seen.append(k["tf32"]) or real(*a, **k))
    setup(flags(tmp_path, tf32=True))
    setup(flags(tmp_path))
    assert seen == [True, False]
