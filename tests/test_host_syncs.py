"""Host syncs per training step and per evaluation batch (utils/host_syncs.py), counted on the CPU:
every call that would make the host wait for a GPU (a value read back, a copy to the host, a
shape that depends on the data) is held to a fixed budget in each stage's loop. Per-epoch work
(the meters' means, the summed counts, the logs) runs outside the loops and is not counted."""
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import utils.evaluation
import utils.loop
import utils.stage2
from tests.helpers import run_script
from utils.host_syncs import HostSyncs

LOOPS = (utils.loop, utils.stage2, utils.evaluation)
# 64 training images in batches of 16 (4 steps), 32 evaluation images (2 batches).
COMMON = ["--dataset", "synthetic", "--arch", "smallcnn", "--train-limit", "64", "--test-limit", "32",
          "--batch-size", "16", "--epochs", "1", "--num-steps", "2", "--eval-steps", "2", "--epsilon", "0.1",
          "--val-size", "0", "--no-progress"]
HSIZE = 16


def counted_run(monkeypatch, capsys, script, argv):
    """Run ``script`` with its loops counted; returns {loop's progress label: [Counter per batch]}."""
    syncs = HostSyncs()
    for module in LOOPS:
        monkeypatch.setattr(module, "tqdm", syncs.tqdm)
    with syncs:
        code, _, err = run_script(capsys, script, argv)
    assert code == 0, err
    return syncs.batches


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
