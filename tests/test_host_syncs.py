"""Host syncs per training step and per evaluation batch (utils/host_syncs.py), counted on the CPU:
every call that would make the host wait for a GPU (a value read back, a copy to the host, a
shape that depends on the data) is held to a fixed budget in each stage's loop. Per-epoch work
(the meters' means, the summed counts, the logs) runs outside the loops and is not counted.

Budgets, per training step / per evaluation batch:
- stage 1 (train_standard.py, Standard AT and TRADES): 0 / 0;
- stage 2 (train_MI_estimator.py, both objectives; train_MI_estimator_only_max.py): 0 / 0, Adam's
  step counts aside (host tensors on every device, unless Adam is fused or capturable);
  --release-passes: 3 per step (|C|, |R|, |W| pick the release's sequence of BatchNorm passes);
- stage 3 (train_MIAT.py, NAMID, NAMID-T, with --mi-grad-clip): 0 / 0, the measured batches of
  the gradient balance included (read once at the epoch's end); --release-passes: 1 per step
  (whether W is empty picks the release's passes);
- test_comparison.py's engine (utils/evaluation/engine.py), PGD and L2 PGD, white-box and transfer:
  0 per batch of the clean pass and of each attack (its timings wait for the device with
  torch.cuda.synchronize, which is not a torch function and not counted)."""
from collections import Counter
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

import utils.evaluation.engine
import utils.training.fast
from models import get_model
from models.estimator import build_estimator
from tests.helpers import Tiny, run_script, save_estimators, tiny_split
from utils.attacks.base import eval_mode
from utils.attacks.registry import build_attack
from utils.evaluation.results import Report
from utils.host_syncs import HostSyncs

LOOPS = (utils.training.fast,)  # every pass over a loader goes through FastPath.batches
# 64 training images in batches of 16 (4 steps), 32 evaluation images (2 batches).
COMMON = ["--dataset", "synthetic", "--arch", "smallcnn", "--train-limit", "64", "--test-limit", "32",
          "--batch-size", "16", "--epochs", "1", "--num-steps", "2", "--eval-steps", "2", "--epsilon", "0.1",
          "--val-size", "0", "--no-progress"]
HSIZE = 16


def totals(batches):
    return [sum(c.values()) for c in batches]


# ---------------------------------------------------------------- the counter itself

SYNCING = {
    "item": lambda t, m: t[0].item(),
    "tolist": lambda t, m: t.tolist(),
    "cpu": lambda t, m: t.cpu(),
    "numpy": lambda t, m: t.numpy(),
    "bool": lambda t, m: bool(t[0]),
    "if": lambda t, m: 1 if (t > 0).any() else 0,
    "float": lambda t, m: float(t.sum()),
    "int": lambda t, m: int(t[0]),
    "index": lambda t, m: [0, 1, 2][t.long()[0]],
    "format": lambda t, m: f"{t.sum():.3f}",
    "nonzero": lambda t, m: t.nonzero(),
    "where": lambda t, m: torch.where(m),
    "mask_index": lambda t, m: t[m],
    "mask_assign": lambda t, m: t.clone().__setitem__(m, 0.0),
    "masked_select": lambda t, m: t.masked_select(m),
    "unique": lambda t, m: t.unique(),
    "torch.unique": lambda t, m: torch.unique(t),
    "tensor": lambda t, m: torch.tensor(len(t), device=t.device),
    "equal": lambda t, m: torch.equal(t, t),
}
FREE = {
    "arithmetic": lambda t, m: (t * 2 + 1).exp().sum(),
    "where": lambda t, m: torch.where(m, t, torch.zeros_like(t)),
    "masked_fill": lambda t, m: t.masked_fill(m, 0.0),
    "masked_scatter": lambda t, m: torch.zeros_like(t).masked_scatter(m, t),
    "int_index": lambda t, m: t[1:3] + t[torch.arange(0, 4, 2, device=t.device)][0],
    "as_tensor_of_tensor": lambda t, m: torch.as_tensor(t, device=t.device),
    "shape": lambda t, m: torch.zeros(t.shape[0], device=t.device),
    "loss": lambda t, m: F.cross_entropy(t.view(1, -1), torch.zeros(1, dtype=torch.long)),
}


@pytest.mark.parametrize("name", list(SYNCING))
def test_the_counter_sees_each_kind_of_sync(name):
    t, m = torch.tensor([1.0, -2.0, 3.0, -4.0]), torch.tensor([True, False, True, False])
    with HostSyncs() as syncs:
        SYNCING[name](t, m)
    assert syncs.total >= 1, name
    assert syncs.total <= 2, syncs.calls  # the call itself (plus an index read for t[0])


@pytest.mark.parametrize("name", list(FREE))
def test_the_counter_counts_nothing_in_sync_free_code(name):
    t, m = torch.tensor([1.0, -2.0, 3.0, -4.0]), torch.tensor([True, False, True, False])
    with HostSyncs() as syncs:
        FREE[name](t, m)
    assert syncs.total == 0, syncs.calls


def test_per_batch_counts_each_loop_body_and_not_the_fetching():
    def batches():
        for k in range(3):
            torch.tensor([k]).item()  # fetching: not the loop's cost
            yield torch.full((2,), float(k))

    with HostSyncs() as syncs:
        for x in syncs.per_batch(batches(), "loop"):
            for _ in range(int(x[0])):  # batch k: k + 1 syncs (the int, then k items)
                x.sum().item()
    assert totals(syncs.batches["loop"]) == [1, 2, 3]
    assert syncs.batches["loop"][2] == Counter(int=1, item=2)


# ---------------------------------------------------------------- the stages


@contextmanager
def counted(monkeypatch):
    """Counts the project's loops, per batch by progress label; Adam's step is not counted (its
    step counts are host tensors unless Adam is fused or capturable: reading them waits for nothing)."""
    syncs = HostSyncs()
    for module in LOOPS:
        monkeypatch.setattr(module, "tqdm", syncs.tqdm)
    adam_step = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        with syncs.paused():
            return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    with syncs:
        yield syncs


def counted_run(monkeypatch, capsys, script, argv):
    """Run ``script`` with its loops counted: {"train": [Counter per step], "eval": [Counter per batch]}."""
    with counted(monkeypatch) as syncs:
        code, _, err = run_script(capsys, script, argv)
    assert code == 0, err
    return {"train": syncs.batches["epoch 1/1"], "eval": syncs.batches["eval"]}


def assert_budget(batches, budget):
    assert len(batches) == len(budget) and totals(batches) == budget, [dict(c) for c in batches]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A SmallCNN state for stage 2's --pre-target."""
    path = tmp_path_factory.mktemp("target") / "target.pth"
    torch.manual_seed(0)
    torch.save(get_model("smallcnn", 10, 3).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def mi_dir(tmp_path_factory):
    """Random stage-2 estimators for stage 3's --mi-dir."""
    folder = tmp_path_factory.mktemp("mi")
    torch.manual_seed(0)
    save_estimators({k: build_estimator(3, 10, HSIZE) for k in ("natural", "adversarial")}, folder)
    return folder


@pytest.mark.parametrize("loss", ["ce", "trades"])
def test_stage1_steps_and_evaluation_batches_make_no_host_sync(monkeypatch, capsys, tmp_path, loss):
    batches = counted_run(monkeypatch, capsys, "train_standard", [*COMMON, "--loss", loss, "--model-dir", tmp_path])
    assert_budget(batches["train"], [0] * 4)
    assert_budget(batches["eval"], [0] * 2)


@pytest.mark.parametrize("script, extra, per_step", [
    ("train_MI_estimator", [], 0),
    ("train_MI_estimator", ["--objective", "paper"], 0),
    ("train_MI_estimator_only_max", [], 0),
    ("train_MI_estimator", ["--release-passes"], 3),
])
def test_stage2_steps_and_evaluation_batches(monkeypatch, capsys, tmp_path, target, script, extra, per_step):
    argv = [*COMMON, "--va-hsize", HSIZE, "--pre-target", target, *extra, "--model-dir", tmp_path]
    batches = counted_run(monkeypatch, capsys, script, argv)
    assert_budget(batches["train"], [per_step] * 4)
    assert_budget(batches["eval"], [0] * 2)


@pytest.mark.parametrize("extra, per_step", [([], 0), (["--adv-loss", "trades"], 0), (["--mi-grad-clip", "1"], 0),
                                             (["--release-passes"], 1)])
def test_stage3_steps_and_evaluation_batches(monkeypatch, capsys, tmp_path, mi_dir, extra, per_step):
    argv = [*COMMON, "--va-hsize", HSIZE, "--mi-dir", mi_dir, *extra, "--model-dir", tmp_path]
    batches = counted_run(monkeypatch, capsys, "train_MIAT", argv)
    assert_budget(batches["train"], [per_step] * 4)  # every batch measured here: 4 ≤ --balance-batches 8
    assert_budget(batches["eval"], [0] * 2)


@pytest.mark.parametrize("transfer", [False, True])
def test_evaluation_engine_batches_make_no_host_sync(monkeypatch, transfer):
    torch.manual_seed(0)
    targets = {"a": Tiny().eval(), "b": Tiny().eval()}
    engine = utils.evaluation.engine.Evaluation(targets, tiny_split(48), batch_size=16, device="cpu",
                                         surrogate=Tiny().eval() if transfer else None, progress=True,
                                         report=Report(echo=False))
    attacks = [build_attack("pgd3"), build_attack("l2-pgd3")]
    with counted(monkeypatch) as syncs:
        results = engine.run(attacks)
    labels = ["a: clean", "b: clean"] + [f"{source}: {a.name}" for source in (["surrogate"] if transfer else ["a", "b"])
                                         for a in attacks]
    for label in labels:
        assert_budget(syncs.batches[label], [0] * 3)
    assert all(r.robust[a.name].shape == (48,) for r in results.values() for a in attacks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_training_step_and_evaluation_batch_never_synchronise():
    """What the counter cannot see (syncs inside kernels): CUDA's own sync check, made an error,
    over a stage-1 step (PGD, the objective, backward, SGD) and an evaluation batch."""
    from types import SimpleNamespace

    import train_standard
    from utils.attacks.pgd import pgd
    from utils.training.loop import evaluate

    torch.manual_seed(0)
    model = get_model("smallcnn", 10, 3).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.rand(32, 3, 32, 32, device="cuda"), torch.arange(32, device="cuda") % 10
    args = SimpleNamespace(loss="ce", beta=6.0)

    def step():
        x_adv = pgd(model, x, y, 0.03, 0.01, 3, "linf")
        loss, _, _ = train_standard.standard_objective(model, x, x_adv, y, args)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # the first step allocates the optimizer's state and picks the kernels
    loader = [(x, y)]
    evaluate(model, loader, 0.03, 0.01, 2, "linf", progress=False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        with eval_mode(model), torch.no_grad():
            (model(x).argmax(dim=1) == y).sum()
        pgd(model, x, y, 0.03, 0.01, 2, "linf")
    finally:
        torch.cuda.set_sync_debug_mode("default")
