"""The cost of stage 3's α balance: the measurement (``--balance-batches``) and the MI-gradient
cap (``--mi-grad-clip``), against a plain NAMID training step.

Each variant runs whole training steps (PGD, the NAMID objective, backward, SGD step) on the
same batch, alternated over ``--repeats`` rounds; the medians give

- the measurement's share of an epoch: K measured steps of the epoch's B, each costing
  (t_measured − t_plain): K·(t_measured − t_plain) / (B·t_plain);
- the cap's cost: every step measures and caps, so (t_capped − t_plain) / t_plain.

    OMP_NUM_THREADS=1 python benchmarks/balance_cost.py --threads 1   # the Fashion-MNIST preset's shapes
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import get_model  # noqa: E402
from models.estimator import build_estimator  # noqa: E402
from utils.attacks.pgd import pgd  # noqa: E402
from utils.namid import freeze, namid_objective  # noqa: E402
from utils.training.balance import measured_batches  # noqa: E402

VARIANTS = {"plain": {}, "measured": {"measure_grads": True}, "capped": {"mi_grad_clip": 1.0}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="smallcnn")
    p.add_argument("--shape", type=int, nargs=3, default=(1, 28, 28), metavar=("C", "H", "W"))
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--va-hsize", type=int, default=512)
    p.add_argument("--epoch-batches", type=int, default=65, help="batches per epoch (6,500 / 100 in the preset)")
    p.add_argument("--balance-batches", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON file for the figures")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c, h, w = args.shape
    model = get_model(args.arch, num_classes=10, in_channels=c)
    est_n, est_a = (freeze(build_estimator(c, 10, args.va_hsize)) for _ in range(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.rand(args.batch_size, c, h, w), torch.randint(0, 10, (args.batch_size,))

    def step(extra):
        x_adv = pgd(model, x, y, 0.1, 0.025, args.pgd_steps)
        model.train()
        loss, _, _ = namid_objective(model, est_n, est_a, x, x_adv, y, alpha=5.0, lam=0.1, **extra)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for extra in VARIANTS.values():  # warm-up
        step(extra)
    seconds = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, extra in VARIANTS.items():
            began = time.perf_counter()
            for _ in range(args.steps):
                step(extra)
            seconds[name].append((time.perf_counter() - began) / args.steps)
    t = {name: statistics.median(v) for name, v in seconds.items()}
    k = len(measured_batches(args.epoch_batches, args.balance_batches))
    figures = {
        "settings": {**vars(args), "shape": list(args.shape), "torch": torch.__version__,
                     "threads": torch.get_num_threads()},
        "step_seconds": t,
        "measurement_share_of_epoch": k * (t["measured"] - t["plain"]) / (args.epoch_batches * t["plain"]),
        "cap_overhead": (t["capped"] - t["plain"]) / t["plain"],
    }
    print(f"{args.arch} {tuple(args.shape)}, batch {args.batch_size}, PGD-{args.pgd_steps}, "
          f"{torch.get_num_threads()} thread(s), median of {args.repeats} rounds of {args.steps} steps:")
    for name, value in t.items():
        print(f"  {name:9s} {value * 1000:8.1f} ms/step")
    print(f"  measurement on {k} of {args.epoch_batches} batches: {100 * figures['measurement_share_of_epoch']:+.2f} % "
          "of an epoch")
    print(f"  cap on every step (--mi-grad-clip): {100 * figures['cap_overhead']:+.2f} % per step")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1) + "\n")
    return figures


if __name__ == "__main__":
    main()
