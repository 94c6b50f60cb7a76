"""Run by tests/test_distributed.py, alone or under torchrun: the gradients of one NAMID step
(stage 3) and one estimator step (stage 2) on a fixed global batch of 16.

Each process takes its shard of the batch; the MI terms are computed on the batch gathered
from all processes (utils.training.distributed.gather_batch). The first process writes the target's
and the estimators' gradients to the path in argv[1]."""
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.estimator import build_estimator  # noqa: E402
from tests.ddp_worker import save_gradients  # noqa: E402
from utils.data.loaders import load_splits  # noqa: E402
from utils.mi.objectives import estimator_loss_release  # noqa: E402
from utils.mi.patterns import select_samples, split_patterns  # noqa: E402
from utils.namid import freeze, namid_objective  # noqa: E402
from utils.training import distributed  # noqa: E402
from utils.training.stage2 import AdvBatch, global_batch, mi_vectors  # noqa: E402

BATCH = 16


def gradients() -> dict:
    ctx = distributed.context()
    # float64: two processes sum the gathered rows' gradients in another order than one process,
    # which in float32 already differs by about 1e-4 relative on some CPUs.
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    # No BatchNorm or dropout in the target: its per-process work is exactly its shard.
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 15 * 15, 10))
    nn.init.normal_(net[-1].weight, std=0.05)
    est_n, est_a = build_estimator(3, 10, 16), build_estimator(3, 10, 16)
    splits, _ = load_splits("synthetic", "data", train_limit=64, seed=0)
    x = splits["train"].images[:BATCH].double() / 255
    x_adv = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    with torch.no_grad():
        y = net(x).argmax(1)  # every sample correct on x, so W is where the noise flips the prediction
    per = BATCH // ctx.world_size
    mine = slice(ctx.rank * per, (ctx.rank + 1) * per)
    grads = {}

    # Stage 3: the NAMID objective through DDP, estimators frozen.
    model = distributed.wrap(net)
    frozen = [freeze(e) for e in (est_n, est_a)]
    loss, _, extra = namid_objective(model, *frozen, x[mine], x_adv[mine], y[mine], alpha=5.0, lam=0.1)
    loss.backward()
    grads.update({f"target.{k}": p.grad for k, p in net.named_parameters()})
    grads["w_size"] = extra["w_size"]

    # Stage 2: the release's estimator objective on the gathered batch, estimators in train mode.
    ests = nn.ModuleDict({"natural": est_n, "adversarial": est_a}).train().requires_grad_(True)
    with torch.no_grad():
        logits_nat, logits_adv = net(x[mine]), net(x_adv[mine])
    natural, noise = split_patterns(x[mine], x_adv[mine])
    b = global_batch(AdvBatch(natural, y[mine], x_adv[mine], noise, logits_nat, logits_nat, logits_adv, logits_adv))
    loss_n, loss_a = estimator_loss_release(*mi_vectors(ests, b, "dv"), select_samples(b.logits_nat, b.logits_adv, b.y))
    (loss_n + loss_a).backward()
    distributed.average_gradients(ests)
    grads.update({f"estimators.{k}": p.grad for k, p in ests.named_parameters()})
    return grads


if __name__ == "__main__":
    save_gradients(gradients, sys.argv[1])
