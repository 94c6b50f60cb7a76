"""Data-parallel scaling on CPU: images/second of the stage-1 PGD-10 training step with one
process and with ``--nproc`` processes under torchrun (gloo), at equal per-process batch.

    python benchmarks/ddp_cpu.py --nproc 2 --arch smallcnn --batch-size 64 --steps 20

Each process runs on one thread, so N processes use N cores; a one-process run with N
threads and N times the batch is timed too, as the other way to use the same cores. Prints
a table and writes JSON (default benchmarks/results/ddp_cpu.json)."""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel run")
    p.add_argument("--arch", default="smallcnn", help="target network (smallcnn: 1x28x28, others 3x32x32)")
    p.add_argument("--batch-size", type=int, default=64, help="images per process and step")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ddp_cpu.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args) -> None:
    """One process's share: time ``steps`` training steps; rank 0 prints images/second as JSON."""
    import torch
    import torch.distributed as dist

    from benchmarks.benchmark import ours_train_step
    from models import get_model
    from utils.data.loaders import BatchLoader
    from utils.data.synthetic import make_synthetic
    from utils.training import distributed
    from utils.training.loop import train_epoch

    ctx = distributed.init("cpu")
    torch.manual_seed(0)
    shape = (1, 28, 28) if args.arch.startswith("smallcnn") else (3, 32, 32)
    model = distributed.wrap(get_model(args.arch, 10, shape[0]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    cfg = argparse.Namespace(epsilon=0.1, step_size=0.025, num_steps=10, distance="l_inf", loss="ce", beta=6.0)
    step = ours_train_step(model, cfg)

    def loader(steps: int):
        train, _ = make_synthetic((args.batch_size * ctx.world_size * steps, 16), shape, 10, 0)
        return BatchLoader(train, args.batch_size * ctx.world_size, shuffle=True, augment=False,
                           generator=torch.Generator().manual_seed(0), rank=ctx.rank, world_size=ctx.world_size)

    warmup, timed = loader(args.warmup), loader(args.steps)  # made before the clock starts
    train_epoch(model, warmup, step, optimizer, "warm-up", progress=False)
    if ctx.enabled:
        dist.barrier()
    began = time.perf_counter()
    train_epoch(model, timed, step, optimizer, "timed", progress=False)
    seconds = torch.tensor(time.perf_counter() - began)
    if ctx.enabled:
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    if ctx.is_main:
        images = args.batch_size * ctx.world_size * args.steps
        print(json.dumps({"processes": ctx.world_size, "threads_per_process": torch.get_num_threads(),
                          "images_per_step": args.batch_size * ctx.world_size,
                          "seconds": float(seconds), "images_per_second": images / float(seconds)}))
    distributed.shutdown()


def launch(args, nproc: int, threads: int, batch: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    flags = ["--arch", args.arch, "--batch-size", str(batch), "--steps", str(args.steps),
             "--warmup", str(args.warmup), "--worker"]
    if nproc == 1:
        cmd = [sys.executable, __file__, *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               __file__, *flags]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"ddp_cpu.py: the {nproc}-process run failed:\n{done.stderr[-2000:]}")
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    if min(args.nproc, args.steps, args.warmup, args.batch_size) < 1:
        sys.exit("ddp_cpu.py: --nproc, --steps, --warmup and --batch-size must be at least 1")
    b = args.batch_size
    runs = {"one process, 1 thread": launch(args, 1, 1, b),
            # the same cores and the same step size as the data-parallel run, used by threads instead
            f"one process, {args.nproc} threads": launch(args, 1, args.nproc, b * args.nproc),
            f"{args.nproc} processes (DDP), 1 thread each": launch(args, args.nproc, 1, b)}
    base = runs["one process, 1 thread"]["images_per_second"]
    print(f"stage-1 PGD-10 training step, {args.arch}, batch {args.batch_size} per process, {args.steps} steps, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print("| run | images/s | × one process |\n|---|---:|---:|")
    for name, r in runs.items():
        r["speedup"] = r["images_per_second"] / base
        print(f"| {name} | {r['images_per_second']:.1f} | {r['speedup']:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"arch": args.arch, "batch_per_process": args.batch_size,
                                          "steps": args.steps, "cores": os.cpu_count(), "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
