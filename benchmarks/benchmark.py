"""Throughput of the per-step work of each stage, ours against the release's (benchmarks/release_reference.py).

Cases (``--only``): train-step (stage 1, Standard AT with PGD-10, step ε/4), estimator-step (stage 2),
namid-step (stage 3), pgd40-eval (clean forward + PGD-40 + forward) and autoattack-100
(AutoAttack on 100 images). Data are synthetic CIFAR-shaped uint8 images (Fashion-MNIST-shaped
for SmallCNN): ours go through ``utils.data.loaders.BatchLoader`` and the scripts' own step functions
inside ``utils.training.loop.train_epoch`` / ``evaluate``; the reference goes through the release's
PIL/torchvision ``DataLoader``. Both run the same model and batch with the same PGD budget.

Prints a table and a summary of ours/reference, and writes JSON (and the table as Markdown)
to ``--out`` (default benchmarks/results/<device>.json). Example:

    python benchmarks/benchmark.py --device cpu --quick --batch-size 32 --iters 3 --repeats 2 --threads 1

``--options amp,channels_last,compile`` times ours only, with every fast-path option off and with
each listed option alone, and writes benchmarks/results/<device>_options.json.
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import train_MIAT  # noqa: E402
from benchmarks import release_reference as ref  # noqa: E402
from models import MODEL_NAMES, get_model  # noqa: E402
from models.estimator import build_estimator  # noqa: E402
from train_standard import standard_objective  # noqa: E402
from utils.attacks.autoattack import autoattack  # noqa: E402
from utils.attacks.pgd import pgd  # noqa: E402
from utils.cli import add_compile_backend_arg  # noqa: E402
from utils.data.loaders import BatchLoader, load_splits  # noqa: E402
from utils.mi.objectives import estimator_loss_release  # noqa: E402
from utils.mi.patterns import select_samples  # noqa: E402
from utils.mi.release_compat import Quirks  # noqa: E402
from utils.namid import freeze, namid_objective  # noqa: E402
from utils.training.fast import FastPath  # noqa: E402
from utils.training.loop import TrainAttack, evaluate, train_epoch  # noqa: E402
from utils.training.losses import ATTACK_FOR_LOSS  # noqa: E402
from utils.training.setup import speed_up  # noqa: E402

CASES = ("train-step", "estimator-step", "namid-step", "pgd40-eval", "autoattack-100")
DEFAULT_ARCHS = {"train-step": ("smallcnn", "resnet18")}  # every other case: ResNet-18, the paper's target
SHAPES = {"smallcnn": (1, 28, 28), "smallcnn-nobn": (1, 28, 28)}  # every other architecture: 3×32×32
# The dataset an epoch is projected onto, by input shape: (train name, train size, test name, test size).
EPOCHS = {(1, 28, 28): ("Fashion-MNIST", 60_000, "Fashion-MNIST test", 10_000),
          (3, 32, 32): ("CIFAR-10", 50_000, "CIFAR-10 test", 10_000)}
NUM_CLASSES = 10
EPSILON = 8 / 255
AA_IMAGES = 100
QUICK_AA = dict(version="custom", attacks_to_run=["apgd-ce", "apgd-t"], n_iter=10)
SUMMARY = (("train-step", "resnet18"), ("estimator-step", "resnet18"), ("namid-step", "resnet18"))
OPTIONS = ("amp", "channels_last", "compile")  # the scripts' fast-path flags, as --options names them


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch-size", type=int, default=256, help="images per step (the release trained with 256)")
    p.add_argument("--iters", type=int, default=None, help="timed steps per case (default 10; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 with --quick)")
    p.add_argument("--arch", default=None,
                   help="comma list of architectures for every case (default: train-step runs smallcnn and "
                        "resnet18, the other cases resnet18)")
    p.add_argument("--only", default=",".join(CASES), help=f"comma list of cases among {', '.join(CASES)}")
    p.add_argument("--quick", action="store_true",
                   help="fewer steps and a small AutoAttack (APGD-CE + APGD-T, 10 iterations) instead of the "
                        "standard one")
    p.add_argument("--aa-version", default=None, choices=("standard", "release", "quick"),
                   help="AutoAttack setting (default: standard; quick with --quick)")
    p.add_argument("--repeats", type=int, default=1,
                   help="alternate ours and the reference this many times per case; the median step is reported")
    p.add_argument("--va-hsize", type=int, default=2048, help="estimators' hidden size H (PAPER.md §3)")
    p.add_argument("--pgd-steps", type=int, default=10, help="PGD steps of the training cases (step ε/4)")
    p.add_argument("--ref-workers", type=int, default=4,
                   help="DataLoader workers of the release's data path (the release used 4, pinned memory on CUDA)")
    p.add_argument("--no-reference", action="store_true", help="time ours only")
    p.add_argument("--amp", action="store_true",
                   help="run ours under bfloat16 autocast (the scripts run fp32 today; the reference stays fp32)")
    p.add_argument("--channels-last", action="store_true", help="ours in NHWC memory format, model and batches")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile ours' target model (the warm-up steps absorb the compilation)")
    add_compile_backend_arg(p)
    p.add_argument("--options", default=None,
                   help=f"comma list among {', '.join(OPTIONS)}: time ours with all of them off (the baseline) and "
                        "with each alone, alternated --repeats times; no reference, no autoattack-100")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); 1 on a shared, oversubscribed machine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/<device>.json)")
    p.set_defaults(sync_bn=False)  # one process: utils.training.setup.speed_up's SyncBatchNorm stays off
    args = p.parse_args(argv)
    if args.iters is None:
        args.iters = 2 if args.quick else 10
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.aa_version is None:
        args.aa_version = "quick" if args.quick else "standard"
    args.only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(args.only) - set(CASES))
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; expected {', '.join(CASES)}")
    if args.arch is not None:
        args.arch = [a.strip() for a in args.arch.split(",") if a.strip()]
        bad = [a for a in args.arch if a not in MODEL_NAMES]
        if bad:
            p.error(f"unknown --arch {', '.join(bad)}; expected among {', '.join(MODEL_NAMES)}")
    if args.options is not None:
        args.options = list(dict.fromkeys(o.strip().replace("-", "_") for o in args.options.split(",") if o.strip()))
        bad = [o for o in args.options if o not in OPTIONS]
        if bad or not args.options:
            p.error(f"unknown --options {', '.join(bad) or '(none)'}; expected among {', '.join(OPTIONS)}")
        if any(getattr(args, o) for o in OPTIONS):
            p.error("--options times each option against all of them off: drop --amp, --channels-last and --compile")
    if args.batch_size < 2 or args.iters < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("--batch-size must be at least 2 (the MI bounds need negatives), --iters and --repeats at least 1, "
                "--warmup at least 0")
    return args


# --------------------------------------------------------------------------- device and clock

def resolve(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmark.py: error: --device cuda but CUDA is not available")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def default_out(device: torch.device, suffix: str = "") -> Path:
    stem = "cpu" if device.type == "cpu" else re.sub(r"[^A-Za-z0-9]+", "_", device_name(device)).strip("_")
    return ROOT / "benchmarks" / "results" / f"{stem}{suffix}.json"


def now(device: torch.device) -> float:
    """Wall-clock seconds after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class Clock:
    """Wraps a loader and marks the start of every step from batch ``warmup`` on, and the end of
    the last, so the first ``warmup`` steps (and a DataLoader's worker start) stay out of the
    timing. Marks are CUDA events on a GPU (no synchronisation between steps, the GPU's own
    timeline) and wall-clock times on a CPU."""

    def __init__(self, loader, warmup: int, device: torch.device):
        self.loader, self.warmup, self.device = loader, warmup, device
        self.marks = []

    def __len__(self) -> int:
        return len(self.loader)

    def _mark(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def __iter__(self):
        it = iter(self.loader)
        for i in range(len(self.loader)):
            if i >= self.warmup:
                self._mark()
            yield next(it)
        self._mark()

    def step_seconds(self) -> list:
        pairs = list(zip(self.marks, self.marks[1:]))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) / 1000 for a, b in pairs]
        return [b - a for a, b in pairs]


# --------------------------------------------------------------------------- data and models

def shape_of(arch: str):
    return SHAPES.get(arch, (3, 32, 32))


def synthetic(shape, n: int, seed: int):
    splits, info = load_splits("synthetic", None, synthetic_size=(n, n), synthetic_shape=shape,
                               synthetic_classes=NUM_CLASSES, seed=seed)
    return splits["train"], info


def ours_loader(split, info, batch: int, device, seed: int, augment: bool = True) -> BatchLoader:
    return BatchLoader(split.to(device), batch, shuffle=augment, augment=augment, info=info, device=device,
                       generator=torch.Generator().manual_seed(seed), drop_last=True)


class ToDevice:
    """The release's loop moved each batch to the device itself."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield x.to(self.device), y.to(self.device)


def target(arch: str, device, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = get_model(arch, NUM_CLASSES, shape_of(arch)[0])
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    if not last.weight.any():
        # SmallCNN's last layer starts at zero (TRADES' init): constant logits would leave
        # AutoAttack without gradients and W always empty.
        last.reset_parameters()
    return model.to(device)


def sgd(model: nn.Module):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)  # PAPER.md §7


def estimators(arch: str, hsize: int, device, seed: int):
    torch.manual_seed(seed + 1)
    return [build_estimator(shape_of(arch)[0], NUM_CLASSES, hsize).to(device) for _ in range(2)]


def step_config(args) -> SimpleNamespace:
    """The flags our objectives read (train_MIAT/train_MI_estimator defaults) and the reference's budget."""
    return SimpleNamespace(epsilon=EPSILON, step_size=EPSILON / 4, num_steps=args.pgd_steps, distance="l_inf",
                           loss="ce", adv_loss="ce", beta=6.0, alpha=5.0, lam=0.1, no_adv_mi=False, no_nat_mi=False,
                           release_loss=False, va_mode="dv", is_internal=False, is_internal_last=False,
                           quirks=Quirks())


# --------------------------------------------------------------------------- our steps (as the scripts build them)

def ours_train_step(model, cfg):
    """train_standard.main's adversarial_step."""
    attack_loss, start = ATTACK_FOR_LOSS[cfg.loss]

    def step(x, y):
        x_adv = pgd(model, x, y, cfg.epsilon, cfg.step_size, cfg.num_steps, cfg.distance, attack_loss, start)
        return standard_objective(model, x, x_adv, y, cfg)
    return step


def ours_estimator_step(frozen, ests, cfg):
    """train_MI_estimator.main's step (default --objective release), on the frozen target."""
    from utils.training.stage2 import attack_batch, mi_vectors  # here, so the other cases run without stage 2's module

    def step(x, y):
        attack = TrainAttack(cfg.epsilon, cfg.step_size, cfg.num_steps, cfg.num_steps, cfg.distance)
        b = attack_batch(frozen, x, y, attack, None, cfg.num_steps)
        sel = select_samples(b.logits_nat, b.logits_adv, y)
        loss_n, loss_a = estimator_loss_release(*mi_vectors(ests, b, cfg.va_mode), sel)
        return loss_n + loss_a, b.logits_nat, {"train_loss_n": loss_n.detach(), "train_loss_a": loss_a.detach(),
                                               "train_w_size": sel.wrong.sum(), "train_r_size": sel.right.sum()}
    return step


def ours_namid_step(model, est_n, est_a, cfg):
    """train_MIAT.main's adversarial_step (NAMID, Standard-AT attack)."""
    attack_loss, start = ATTACK_FOR_LOSS[cfg.adv_loss]

    def step(x, y):
        x_adv = pgd(model, x, y, cfg.epsilon, cfg.step_size, cfg.num_steps, cfg.distance, attack_loss, start)
        return namid_objective(model, est_n, est_a, x, x_adv, y, **train_MIAT.namid_kwargs(cfg))
    return step


def fast_path(model: nn.Module, args):
    """The target and the batch options as the scripts set them: ``speed_up`` (channels_last,
    then torch.compile; no DDP outside torchrun) and ``FastPath`` (amp, NHWC batches), which
    ``train_epoch`` / ``evaluate`` apply to every batch. Returns (model, FastPath, a note naming
    the memory-format and compile options; amp shows in the dtype column)."""
    note = ", ".join(o for o in ("channels_last", "compile") if getattr(args, o))
    fast = FastPath(amp=args.amp, channels_last=args.channels_last, compile=args.compile,
                    compile_backend=args.compile_backend)
    return speed_up(model, fast), fast, f"; fast path: {note}" if note else ""


def ours_dtype(args) -> str:
    return "bfloat16 (autocast)" if args.amp else "float32"


# --------------------------------------------------------------------------- the cases

def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device):
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _result(case, arch, impl, dtype, batch, steps, epoch_name, epoch_images, notes="", peak=None):
    """One row: ``steps`` are the seconds of each timed step; the median sets the throughput,
    so that a burst of load from elsewhere on a shared machine moves it less than the mean."""
    per_step = statistics.median(steps)
    return {"case": case, "arch": arch, "input": "x".join(map(str, shape_of(arch))), "impl": impl, "dtype": dtype,
            "batch": batch, "iters": len(steps), "step_seconds": steps, "seconds_per_iter": per_step,
            "seconds_per_iter_mean": statistics.mean(steps), "images_per_s": batch / per_step,
            "epoch_dataset": epoch_name, "epoch_images": epoch_images, "epoch_seconds": epoch_images * per_step / batch,
            "peak_memory_mib": peak, "notes": notes}


def time_ours(case: str, arch: str, args, device, split, info):
    """Our step as the script builds it, inside utils.training.loop.train_epoch over a BatchLoader.

    Returns (seconds of each timed step, notes, peak memory in MiB or None)."""
    cfg = step_config(args)
    model = target(arch, device, args.seed)
    if case == "estimator-step":
        model.eval().requires_grad_(False)  # stage 2's frozen target (training.stage2.prepare), then the fast path
    model, fast, fast_note = fast_path(model, args)
    if case == "train-step":
        trained, optimizer, step = model, sgd(model), ours_train_step(model, cfg)
        notes = f"PGD-{cfg.num_steps} + 1 forward of x̃ (Standard AT)"
    elif case == "estimator-step":
        trained = nn.ModuleDict(dict(zip(("natural", "adversarial"), estimators(arch, args.va_hsize, device,
                                                                                args.seed))))
        optimizer = torch.optim.Adam(trained.parameters(), lr=1e-2)
        step = ours_estimator_step(model, trained, cfg)
        notes = f"H={args.va_hsize}; PGD-{cfg.num_steps} + 2 no-grad target forwards, each local net once"
    else:
        est_n, est_a = (freeze(e) for e in estimators(arch, args.va_hsize, device, args.seed))
        trained, optimizer, step = model, sgd(model), ours_namid_step(model, est_n, est_a, cfg)
        notes = f"H={args.va_hsize}; PGD-{cfg.num_steps} + 2 target forwards, each local net once"
    reset_peak(device)
    clock = Clock(ours_loader(split, info, args.batch_size, device, args.seed), args.warmup, device)
    train_epoch(trained, clock, step, optimizer, case, progress=False, fast=fast)
    return clock.step_seconds(), notes + fast_note, peak_mib(device)


def time_pgd40(arch: str, args, device, split, info):
    """utils.training.loop.evaluate: clean forward, PGD-40 (step ε/4), forward, under no_grad where
    possible; same return as time_ours."""
    model, fast, fast_note = fast_path(target(arch, device, args.seed), args)
    reset_peak(device)
    clock = Clock(ours_loader(split, info, args.batch_size, device, args.seed, augment=False), args.warmup, device)
    evaluate(model, clock, EPSILON, EPSILON / 4, 40, "l_inf", progress=False, fast=fast)
    return clock.step_seconds(), "forward + PGD-40 + forward" + fast_note, peak_mib(device)


def time_case(case: str, arch: str, args, device, split, info):
    """Ours on one case (all but autoattack-100); same return as time_ours."""
    if case == "pgd40-eval":
        return time_pgd40(arch, args, device, split, info)
    return time_ours(case, arch, args, device, split, info)


def time_reference(case: str, arch: str, args, device, split):
    """The release's step (release_reference.py) over its PIL/torchvision DataLoader; same return as time_ours."""
    cfg = step_config(args)
    model = target(arch, device, args.seed)
    loader = ref.release_loader(split.images, split.labels, args.batch_size, args.ref_workers, args.seed,
                                pin_memory=device.type == "cuda")
    reset_peak(device)
    clock = Clock(ToDevice(loader, device), args.warmup, device)
    if case == "train-step":
        optimizer = sgd(model)
        for x, y in clock:
            ref.train_step(model, optimizer, x, y, cfg)
        notes = f"the release's PGD-{cfg.num_steps} + 1 forward of x̃"
    elif case == "estimator-step":
        model.eval()
        est_n, est_a = estimators(arch, args.va_hsize, device, args.seed)
        optimizers = tuple(torch.optim.Adam(e.parameters(), lr=1e-2) for e in (est_n, est_a))
        for e in (est_n, est_a):
            e.train()
        for x, y in clock:
            ref.estimator_step(model, est_n, est_a, optimizers, x, y, cfg)
        notes = (f"H={args.va_hsize}; the release's PGD-{cfg.num_steps} + 6 target forwards, "
                 "each local net twice")
    else:
        est_n, est_a = (freeze(e) for e in estimators(arch, args.va_hsize, device, args.seed))
        optimizer = sgd(model)
        for x, y in clock:
            ref.namid_step(model, est_n, est_a, optimizer, x, y, cfg)
        notes = (f"H={args.va_hsize}; the release's PGD-{cfg.num_steps} + 7 target forwards, "
                 "each local net twice")
    return clock.step_seconds(), f"{notes}; DataLoader workers={args.ref_workers}", peak_mib(device)


def case_data(case: str, arch: str, args):
    """Synthetic data for the warm-up and timed steps, and the epoch the step is projected onto
    (the training set; the test set for pgd40-eval): (split, info, epoch name, epoch images)."""
    shape = shape_of(arch)
    split, info = synthetic(shape, args.batch_size * (args.warmup + args.iters), args.seed)
    epochs = EPOCHS.get(shape, (f"{shape}", 50_000, f"{shape}", 10_000))
    return (split, info, *(epochs[2:] if case == "pgd40-eval" else epochs[:2]))


def alternate(timers: dict, repeats: int):
    """Runs each timer in turn, ``repeats`` rounds (a, b, a, b, ...), so that a drift in the
    machine's load hits all alike. A timer returns (step seconds, notes, peak MiB or None);
    returns {name: all step seconds}, {name: notes}, {name: highest peak}."""
    steps, notes, peaks = {n: [] for n in timers}, {}, {}
    for _ in range(repeats):
        for name, timer in timers.items():
            times, notes[name], peak = timer()
            steps[name] += times
            peaks[name] = peak if peaks.get(name) is None else max(peaks[name], peak)
    return steps, notes, peaks


def run_training_case(case: str, arch: str, args, device) -> list:
    """Ours and the reference on the same batches and budget, alternated ``--repeats`` times
    (ours, reference, ours, ...) so that a drift in the machine's load hits both alike."""
    split, info, epoch_name, epoch_images = case_data(case, arch, args)
    timers = {"ours": lambda: time_ours(case, arch, args, device, split, info)}
    if not args.no_reference:
        timers["reference"] = lambda: time_reference(case, arch, args, device, split)
    steps, notes, peaks = alternate(timers, args.repeats)
    dtypes = {"ours": ours_dtype(args), "reference": "float32"}
    return [_result(case, arch, impl, dtypes[impl], args.batch_size, steps[impl], epoch_name, epoch_images,
                    notes[impl], peaks[impl]) for impl in timers]


def run_pgd40(arch: str, args, device) -> list:
    split, info, name, images = case_data("pgd40-eval", arch, args)
    steps, notes, peak = time_pgd40(arch, args, device, split, info)
    return [_result("pgd40-eval", arch, "ours", ours_dtype(args), args.batch_size, steps, name, images, notes, peak)]


def with_option(args, option: str):
    """``args`` with every fast-path option off but ``option`` ("baseline": all off)."""
    return argparse.Namespace(**{**vars(args), **{o: o == option for o in OPTIONS}})


def run_options(case: str, arch: str, args, device) -> list:
    """Ours with every fast-path option off (the baseline) and with each of ``--options`` alone,
    alternated ``--repeats`` times on the same batches; each row adds ``option`` and
    ``x_baseline`` (its img/s over the baseline's)."""
    split, info, epoch_name, epoch_images = case_data(case, arch, args)
    variants = {v: with_option(args, v) for v in ("baseline", *args.options)}
    timers = {v: (lambda a=a: time_case(case, arch, a, device, split, info)) for v, a in variants.items()}
    steps, notes, peaks = alternate(timers, args.repeats)
    found = [{"option": v, **_result(case, arch, "ours", ours_dtype(a), args.batch_size, steps[v], epoch_name,
                                     epoch_images, notes[v], peaks[v])} for v, a in variants.items()]
    for r in found:
        r["x_baseline"] = r["images_per_s"] / found[0]["images_per_s"]
    return found


def run_autoattack(arch: str, args, device) -> list:
    """AutoAttack on AA_IMAGES images, labelled by the model's own predictions so that every point
    starts correctly classified. Its cost grows with the points that stay robust after each attack:
    on this untrained (non-robust) model most fall to APGD-CE early, so on a robust model expect more."""
    shape = shape_of(arch)
    split, _ = synthetic(shape, AA_IMAGES, args.seed)
    model = target(arch, device, args.seed).eval()
    x = split.images.to(device).float() / 255
    with torch.no_grad():
        y = model(x).argmax(1)
    if args.aa_version == "quick":
        kwargs, label = QUICK_AA, "custom APGD-CE + APGD-T, 10 iterations (--quick; NOT standard AutoAttack)"
    else:
        kwargs, label = {"version": args.aa_version}, f"AutoAttack version {args.aa_version}"
    reset_peak(device)
    start = now(device)
    x_adv = autoattack(model, x, y, EPSILON, "linf", batch_size=AA_IMAGES, **kwargs)
    seconds = now(device) - start
    with torch.no_grad():
        robust = (model(x_adv).argmax(1) == y).float().mean().item() * 100
    name, images = EPOCHS.get(shape, (None, None, f"{shape}", 10_000))[2:]
    return [_result("autoattack-100", arch, "ours", "float32", AA_IMAGES, [seconds], name, images,
                    f"{label}; {robust:.0f}% still robust after it (the cost grows with that share; untrained model)",
                    peak_mib(device))]


# --------------------------------------------------------------------------- report

COLUMNS = ("case", "arch", "input", "impl", "dtype", "batch", "s/iter (median)", "img/s", "s/epoch", "epoch of")


def rows(results):
    for r in results:
        yield (r["case"], r["arch"], r["input"], r["impl"], r["dtype"], str(r["batch"]), f"{r['seconds_per_iter']:.3g}",
               f"{r['images_per_s']:.1f}", f"{r['epoch_seconds']:.4g}", f"{r['epoch_dataset']} ({r['epoch_images']:,})")


OPTION_COLUMNS = ("case", "arch", "option", "img/s", "× baseline")


def option_rows(results):
    for r in results:
        yield r["case"], r["arch"], r["option"], f"{r['images_per_s']:.1f}", f"{r['x_baseline']:.2f}"


def table(results, columns=COLUMNS, cells=rows) -> str:
    body = [columns, *cells(results)]
    widths = [max(len(row[i]) for row in body) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(results, columns=COLUMNS, cells=rows) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells(results)]
    return "\n".join(lines)


def summarize(results) -> dict:
    """ours / reference in throughput (images per second): > 1 means ours is faster."""
    found = {(r["case"], r["arch"], r["impl"]): r for r in results}
    summary = {}
    for case, arch in sorted({(r["case"], r["arch"]) for r in results}, key=lambda k: (CASES.index(k[0]), k[1])):
        ours, base = found.get((case, arch, "ours")), found.get((case, arch, "reference"))
        if ours and base:
            summary[f"{case}/{arch}"] = {"ours_images_per_s": ours["images_per_s"],
                                         "reference_images_per_s": base["images_per_s"],
                                         "ours_over_reference": ours["images_per_s"] / base["images_per_s"]}
    return summary


def git_commit():
    """HEAD, with "+dirty" when tracked files differ from it (the numbers are then of another tree)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
        commit = head.stdout.strip()
        return (commit + ("+dirty" if dirty.stdout.strip() else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = resolve(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the scripts run (training.device.prepare_device); both sides alike
    if args.threads:
        torch.set_num_threads(args.threads)
    name = device_name(device)
    args.commit = git_commit()  # before the run: the results files it writes would count as changes
    out = Path(args.out) if args.out else default_out(device, "_options" if args.options else "")
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    load = f"; load average {load_before[0]:.1f}" if load_before else ""
    print(f"device: {name} ({device.type}); torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"batch {args.batch_size}, warm-up {args.warmup}, timed {args.iters} × {args.repeats}{load}", flush=True)

    compiles = args.compile or "compile" in (args.options or ())
    results = []
    for case in (c for c in CASES if c in args.only):
        if args.options and case == "autoattack-100":
            print(f"  {case}: skipped with --options (one run without warm-up: it would time the compilation)")
            continue
        for arch in args.arch or DEFAULT_ARCHS.get(case, ("resnet18",)):
            print(f"  {case} {arch} ...", flush=True)
            if compiles:
                torch._dynamo.reset()  # else the graphs of earlier cases count toward dynamo's recompile limit
            if args.options:
                results += run_options(case, arch, args, device)
            elif case == "pgd40-eval":
                results += run_pgd40(arch, args, device)
            elif case == "autoattack-100":
                results += run_autoattack(arch, args, device)
            else:
                results += run_training_case(case, arch, args, device)
            # Written after every case: a run cut short (a device's time limit) keeps what it measured.
            write_results(args, name, device, results, out, load_before, done=False)

    print()
    if args.options:
        print(table(results, OPTION_COLUMNS, option_rows))
        print("\n× baseline: img/s with the option alone over img/s with every option off (> 1: the option pays off)")
        if "compile" in args.options and args.warmup == 0:
            print("note: --warmup 0 with compile: the timed steps include the compilation.")
    else:
        print(table(results))
    summary = summarize(results)
    if summary:
        print("\nours / reference (throughput; > 1: ours faster):")
        for key, s in summary.items():
            mark = "" if tuple(key.split("/")) in SUMMARY else " (extra)"
            print(f"  {key:28s} {s['ours_over_reference']:6.2f}x   "
                  f"({s['ours_images_per_s']:.1f} vs {s['reference_images_per_s']:.1f} img/s){mark}")
    for r in results:
        if r["notes"]:
            option = f" {r['option']}" if args.options else ""
            print(f"note: {r['case']} {r['arch']} {r['impl']}{option}: {r['notes']}")
    if device.type == "cpu":
        print("note: CPU timings on a shared machine are noisy; compare ratios from the same run only.")

    record = write_results(args, name, device, results, out, load_before, done=True)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return record


def write_results(args, name: str, device, results: list, out: Path, load_before, done: bool) -> dict:
    """The JSON record and its Markdown table; ``done`` False marks a run still in progress."""
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    record = {
        "device": name, "device_type": device.type, "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average": {"before": load_before, "after": load_after}, "commit": args.commit,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "complete": done,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "commit")}, "epsilon": EPSILON,
    }
    heading = f"Device: {name}, batch {args.batch_size}, {args.iters} timed steps × {args.repeats}; "
    if args.options:
        record["options"] = results
        heading += "img/s from the median step; × baseline: over every option off\n\n"
        text = markdown(results, OPTION_COLUMNS, option_rows)
    else:
        summary = summarize(results)
        record.update({"reference_namid_passes": list(ref.NAMID_PASSES), "results": results, "summary": summary})
        heading += "s/iter is the median step\n\n"
        text = markdown(results)
        if summary:
            text += "\n\n| case | ours / reference (throughput) |\n|---|---:|\n" + "\n".join(
                f"| {key} | {s['ours_over_reference']:.2f}× |" for key, s in summary.items())
    if not done:
        heading = "(in progress: the run had not finished when this was written)\n\n" + heading
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    out.with_suffix(".md").write_text(heading + text + "\n")
    return record


if __name__ == "__main__":
    main()
