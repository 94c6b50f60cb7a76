"""Flags that several scripts share, defined once, and the records they become.

Only the scripts and this module read flags: ``data_spec``, ``fast_path``, ``train_attack``,
``estimator_spec`` and the like turn the parsed namespace into the typed records that library
code takes. Every ``--long-flag`` also answers to ``--long_flag`` (the release's spelling).
Errors in flags print one line and exit with status 2, as argparse does, without a usage dump."""
import argparse
import math
import sys
from fractions import Fraction
from typing import Dict, Optional

import torch.nn as nn

from models import MODEL_NAMES
from models.custom import NORMALIZE_PRESETS, Normalization, check_arch, parse_normalization
from utils.data.loaders import DATASETS
from utils.data.splits import DatasetInfo
from utils.mi.bounds import resolve_mode
from utils.mi.estimators import EstimatorSpec, internal_layer
from utils.mi.release_compat import QUIRK_FLAGS, Quirks
from utils.training.fast import FastPath
from utils.training.loop import TrainAttack
from utils.training.run import Run
from utils.training.setup import DataSpec, DeviceSpec, SGDSpec
from utils.training.stage2 import Stage2Setup, Stage2Spec, adam


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose long options accept both hyphen and underscore spellings."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        self.flags = set()  # every option string, both spellings: what run_pipeline.py routes by
        super().__init__(*args, **kwargs)

    def add_argument(self, *names, **kwargs):
        spelled = list(names)
        for name in names:
            if name.startswith("--") and "-" in name[2:]:
                alias = "--" + name[2:].replace("-", "_")
                if alias not in spelled:
                    spelled.append(alias)
        self.flags.update(name for name in spelled if name.startswith("-"))
        return super().add_argument(*spelled, **kwargs)

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def number(text: str) -> float:
    """A float that may be written as a fraction of two decimals, e.g. ``8/255`` or ``0.5/255``."""
    try:
        if "/" in text:
            numerator, denominator = text.split("/")  # more than one "/" is a ValueError
            value = float(Fraction(numerator) / Fraction(denominator))
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def linf_budget_problem(value: float, flag: str) -> Optional[str]:
    """Images are in [0, 1]: an L∞ budget of 1 or more allows any image, and is almost surely a
    budget on the 0–255 scale."""
    if value >= 1:
        return (f"{flag} {value:g} is an L-inf budget of {value:g} on images in [0, 1], i.e. any image; "
                f"on the 0-255 scale write {value:g}/255")
    return None


def add_data_args(p: Parser, selects: bool = True) -> None:
    """``selects``: the script picks a model on the held-out split, so one is held out by default
    (PAPER.md §6 and §9: the release chose its models on the test set)."""
    p.add_argument("--dataset", default="cifar10", choices=DATASETS, metavar="{" + ",".join(DATASETS) + "}",
                   help="dataset to train and evaluate on")
    p.add_argument("--data-dir", default="data", help="where the dataset's files live (see data/README.md)")
    p.add_argument("--train-limit", type=int, default=None, help="train on a fixed, seeded subset of N images")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on a fixed, seeded subset of N images")
    if selects:
        p.add_argument("--val-size", type=int, default=None,
                       help="hold out N training images for model selection and the per-epoch metrics (default: "
                            "1000, or a tenth of a training split under 10,000; 0: the test split, as the release)")
    else:
        p.add_argument("--val-size", type=int, default=0,
                       help="hold out N training images (not used for selection here; 0: none)")
    p.add_argument("--workers", type=int, default=0,
                   help="accepted for the release's command lines; the tensor data pipeline needs no workers")


def add_model_args(p: Parser, default: str = "resnet18") -> None:
    p.add_argument("--arch", default=default, choices=MODEL_NAMES, metavar="{" + ",".join(MODEL_NAMES) + "}",
                   help="target network")
    add_normalize_arg(p)


def normalize_spec(text: str) -> str:
    """The --normalize value as given (config.json records it so), once it parses."""
    try:
        parse_normalization(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def arch_spec(text: str) -> str:
    """An --arch value: a name of MODEL_NAMES or ``module.path:callable`` (imported when the model is built)."""
    try:
        return check_arch(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


NORMALIZE_HELP = ("normalise the inputs inside the model: MEAN/STD, one comma-separated value per channel, e.g. "
                  "0.4914,0.4822,0.4465/0.2471,0.2435,0.2616, or a preset (" + ", ".join(NORMALIZE_PRESETS) + "); "
                  "attacks still work on images in [0, 1] (default: none)")


def add_normalize_arg(p: Parser, **kwargs) -> None:
    """--normalize, for the training scripts (recorded in config.json) and per model in test_comparison.py."""
    kwargs.setdefault("default", None)
    p.add_argument("--normalize", type=normalize_spec, metavar="MEAN/STD", help=NORMALIZE_HELP, **kwargs)


def add_attack_args(p: Parser, num_steps: int = 10, eval_steps: Optional[int] = 20,
                    eval_help: str = "PGD steps for the per-epoch robust accuracy") -> None:
    p.add_argument("--distance", default="l_inf", choices=("l_inf", "l_2"), help="threat model")
    p.add_argument("--epsilon", type=number, default=None,
                   help="perturbation budget, e.g. 8/255 (default: 8/255 for l_inf, 0.5 for l_2)")
    p.add_argument("--step-size", type=number, default=None, help="PGD step size (default epsilon/4)")
    p.add_argument("--num-steps", type=int, default=num_steps, help="PGD steps while training")
    p.add_argument("--eval-steps", type=int, default=eval_steps, help=eval_help)


def add_optim_args(p: Parser, epochs: int = 100, batch_size: int = 256, lr: float = 0.1,
                   milestones=(75, 90)) -> None:
    p.add_argument("--epochs", type=int, default=epochs, help="training epochs")
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help="global batch (the paper's 1024 or the release's 256; under torchrun split over processes)")
    p.add_argument("--lr", type=number, default=lr, help="SGD learning rate")
    p.add_argument("--momentum", type=number, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=number, default=2e-4, help="SGD weight decay")
    p.add_argument("--lr-milestones", type=int, nargs="*", default=list(milestones),
                   help="epochs at which the learning rate is multiplied by --lr-gamma")
    p.add_argument("--lr-gamma", type=number, default=0.1, help="learning-rate factor at each milestone")
    p.add_argument("--warm-up-epochs", type=int, default=0,
                   help="epochs of clean cross-entropy training before adversarial training starts")
    p.add_argument("--epsilon-ramp-epochs", type=int, default=0,
                   help="grow the training epsilon linearly from 0 over this many adversarial epochs")


def add_run_args(p: Parser, model_dir: str) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data order and attacks")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda when available")
    p.add_argument("--model-dir", default=model_dir, help="where checkpoints, config.json and metrics.jsonl go")
    p.add_argument("--resume", action="store_true",
                   help="continue from <model-dir>/last.pth (the same flags; only --epochs and speed flags may change)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a --model-dir that already holds a run, replacing it")
    p.add_argument("--save-freq", type=int, default=0, help="also keep model_epoch<N>.pth every N epochs (0: never)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def finish_attack_args(p: Parser, args: argparse.Namespace) -> argparse.Namespace:
    """Fill the norm-dependent defaults and reject budgets that cannot be meant."""
    if args.epsilon is None:
        args.epsilon = 8 / 255 if args.distance == "l_inf" else 0.5
    if args.step_size is None:
        args.step_size = args.epsilon / 4
    if not args.epsilon > 0:
        p.error(f"--epsilon must be positive, got {args.epsilon}")
    if args.distance == "l_inf" and (problem := linf_budget_problem(args.epsilon, "--epsilon")):
        p.error(problem)
    if not args.step_size > 0:
        p.error(f"--step-size must be positive, got {args.step_size}")
    for flag in ("num_steps", "eval_steps"):
        if getattr(args, flag, 1) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    return args


def warn_without_adversarial_epoch(args: argparse.Namespace) -> None:
    """Clean warm-up epochs that fill the whole run leave nothing adversarial: say so (a short
    smoke test may want exactly that, so it is not an error)."""
    if args.warm_up_epochs >= args.epochs:
        print(f"warning: --warm-up-epochs {args.warm_up_epochs} covers all --epochs {args.epochs}: "
              "no adversarial training will run", file=sys.stderr)


def check_positive(p: Parser, args: argparse.Namespace, *flags: str) -> None:
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and not value > 0:  # "not >" also refuses NaN
            p.error(f"--{flag.replace('_', '-')} must be positive, got {value}")


def check_non_negative(p: Parser, args: argparse.Namespace, *flags: str) -> None:
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and not value >= 0:  # "not >=" also refuses NaN
            p.error(f"--{flag.replace('_', '-')} must not be negative, got {value}")


def add_estimator_args(p: Parser) -> None:
    """The MI estimator's flags, with the release's names (PAPER.md §3)."""
    p.add_argument("--va-mode", default="dv", choices=("dv", "fd", "nce", "jsd"),
                   help="MI lower bound: dv (Donsker-Varadhan), fd (f-divergence, see --va-fd-measure), nce")
    p.add_argument("--va-fd-measure", default="JSD", help="f-divergence measure for --va-mode fd (JSD)")
    p.add_argument("--va-hsize", type=int, default=2048, help="hidden width H of the estimator's 1x1 blocks")
    p.add_argument("--is-internal", action="store_true",
                   help="the global net reads the target's layer3 features instead of its logits")
    p.add_argument("--is-internal-last", action="store_true",
                   help="the global net reads the target's layer4 features instead of its logits")


def finish_estimator_args(p: Parser, args: argparse.Namespace) -> argparse.Namespace:
    """``--va-mode`` becomes the bound it names (``fd`` with ``--va-fd-measure JSD`` is ``jsd``)."""
    try:
        args.va_mode = resolve_mode(args.va_mode, args.va_fd_measure)
    except ValueError as err:
        p.error(str(err))
    if args.is_internal and args.is_internal_last:
        p.error("--is-internal and --is-internal-last exclude each other")
    check_positive(p, args, "va_hsize")
    return args


COMPILE_BACKENDS = ("inductor", "aot_eager")


def add_compile_backend_arg(p: Parser) -> None:
    p.add_argument("--compile-backend", default="inductor", choices=COMPILE_BACKENDS,
                   help="backend of --compile; aot_eager traces the same graphs (Dynamo, AOTAutograd) without "
                        "generating code: quick to compile, for checking a run before a long one")


TF32_HELP = ("TF32 for float32 matrix products on CUDA (cuDNN's convolutions use it by default already); "
             "off by default: full fp32 products (docs/choices.md)")


def add_speed_args(p: Parser) -> None:
    """The GPU fast path and multi-GPU options (README "Speed and scale")."""
    p.add_argument("--amp", action="store_true",
                   help="bf16 autocast for forward passes; losses, input gradients and MI scores stay fp32")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format for the model and batches")
    p.add_argument("--compile", action="store_true", help="torch.compile the target model")
    add_compile_backend_arg(p)
    p.add_argument("--no-cudnn-benchmark", action="store_true", help="turn off cudnn.benchmark (on by default on CUDA)")
    p.add_argument("--tf32", action="store_true", help=TF32_HELP)
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes under torchrun")


def add_release_args(p: Parser) -> None:
    p.add_argument("--release-compat", action="store_true",
                   help="switch on every --release-* quirk below: the release's numerics (PAPER.md §10)")
    for flag, what in QUIRK_FLAGS.items():
        p.add_argument(f"--{flag}", action="store_true", help=what)


def finish_release_args(args: argparse.Namespace) -> argparse.Namespace:
    """``--release-compat`` sets every quirk flag, so config.json records each one that was on;
    ``args.quirks`` holds them as the :class:`Quirks` that library code takes."""
    if args.release_compat:
        for flag in QUIRK_FLAGS:
            setattr(args, flag.replace("-", "_"), True)
    args.quirks = Quirks(**{name: bool(vars(args)[f"release_{name}"]) for name in Quirks.names()})
    if args.quirks.batch_bounds and args.va_mode in ("jsd", "nce"):
        print(f"note: --release-batch-bounds with --va-mode {args.va_mode}: every sample gets the batch mean "
              "of the bound, so the cosine terms carry no gradient, as in the release", file=sys.stderr)
    return args


def add_stage2_args(p: Parser, *, model_dir: str, epochs: int, batch_size: int, milestones, gamma: float) -> None:
    """Flags of both stage-2 scripts, with the release's names; the defaults are each script's."""
    add_data_args(p, selects=False)
    add_model_args(p)
    p.add_argument("--pre-target", required=True,
                   help="the frozen target h_θ0: stage 1's best_model.pth (or its last.pth)")
    add_estimator_args(p)
    add_release_args(p)
    # The paper's threat model, the one stage 1 trained for (L∞ 8/255, PGD-10, step ε/4).
    # The release's stage 2 defaulted to L2 ε 0.5 with 20 steps: --distance l_2 --num-steps 20.
    add_attack_args(p, num_steps=10, eval_steps=None,
                    eval_help="PGD steps for the per-epoch table and accuracy (default: --num-steps, the same attack)")
    p.add_argument("--epochs", type=int, default=epochs, help="estimator training epochs")
    p.add_argument("--batch-size", type=int, default=batch_size, help="images per step")
    p.add_argument("--lr-mi", type=number, default=1e-2, help="Adam learning rate of the estimators")
    p.add_argument("--lr-milestones", type=int, nargs="*", default=list(milestones),
                   help="epochs at which the learning rate is multiplied by --lr-gamma")
    p.add_argument("--lr-gamma", type=number, default=gamma, help="learning-rate factor at each milestone")
    add_speed_args(p)
    add_run_args(p, model_dir=model_dir)


def finish_stage2_args(p: Parser, args: argparse.Namespace) -> argparse.Namespace:
    if args.eval_steps is None:
        args.eval_steps = args.num_steps
    finish_attack_args(p, args)
    finish_estimator_args(p, args)
    finish_release_args(args)
    check_positive(p, args, "epochs", "batch_size", "lr_mi", "lr_gamma")
    check_non_negative(p, args, "save_freq", "val_size")
    return args


# --------------------------------------------------------------------------- flags to records
# Only the scripts and this module read flags; library code takes the records built here.

def data_spec(args: argparse.Namespace) -> DataSpec:
    return DataSpec(args.dataset, args.data_dir, args.batch_size, seed=args.seed, train_limit=args.train_limit,
                    test_limit=args.test_limit, val_size=args.val_size)


def device_spec(args: argparse.Namespace) -> DeviceSpec:
    return DeviceSpec(args.device, cudnn_benchmark=not args.no_cudnn_benchmark, tf32=args.tf32)


def fast_path(args: argparse.Namespace) -> FastPath:
    """The options of ``add_speed_args``."""
    return FastPath(amp=args.amp, channels_last=args.channels_last, compile=args.compile,
                    compile_backend=args.compile_backend, sync_bn=args.sync_bn)


def normalization(args: argparse.Namespace) -> Optional[Normalization]:
    """``--normalize`` as the per-channel mean and std the model's wrapper applies (None: off)."""
    return parse_normalization(args.normalize) if args.normalize else None


def train_attack(args: argparse.Namespace) -> TrainAttack:
    return TrainAttack(args.epsilon, args.step_size, args.num_steps, args.eval_steps, args.distance)


def sgd_spec(args: argparse.Namespace) -> SGDSpec:
    return SGDSpec(args.lr, args.momentum, args.weight_decay, args.lr_milestones, args.lr_gamma)


def estimator_layer(args: argparse.Namespace) -> Optional[str]:
    return internal_layer(args.is_internal, args.is_internal_last)


def estimator_spec(args: argparse.Namespace, info: DatasetInfo) -> EstimatorSpec:
    """The estimator ``--va-hsize``, ``--is-internal`` and ``--is-internal-last`` describe, for ``info``'s images."""
    return EstimatorSpec(args.va_hsize, estimator_layer(args), info.in_channels, info.num_classes, info.image_size)


def estimator_settings(args: argparse.Namespace) -> Dict[str, object]:
    """The flags that fix how the estimators read and score their inputs: stage 3 must use stage 2's."""
    return {"va_mode": args.va_mode, "va_hsize": args.va_hsize, "is_internal": args.is_internal,
            "is_internal_last": args.is_internal_last}


def flags_of(args: argparse.Namespace) -> dict:
    """The flags a run records in config.json: every plain value of the parsed arguments."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}


def training_run(args: argparse.Namespace, modules: Dict[str, nn.Module], optimizer, scheduler, generator,
                 held_out: int, select_by: str = "pgd_acc") -> Run:
    """The run that a script's flags (``add_run_args``, ``--epochs``) describe; config.json records
    ``held_out`` as ``val_size``, the number of images the run held out."""
    config = {**flags_of(args), "val_size": held_out}
    return Run(args.model_dir, config, modules, optimizer, scheduler, epochs=args.epochs, resume=args.resume,
               overwrite=args.overwrite, seed=args.seed, save_freq=args.save_freq, held_out=bool(held_out),
               generator=generator, select_by=select_by)


def stage2_spec(args: argparse.Namespace) -> Stage2Spec:
    """What ``add_stage2_args`` describes, for ``utils.training.stage2.prepare``."""
    return Stage2Spec(args.model_dir, data_spec(args), device_spec(args), args.arch, args.pre_target, fast_path(args),
                      train_attack(args), estimator_layer(args), args.va_mode, args.quirks, not args.no_progress,
                      normalization(args))


def estimator_run(args: argparse.Namespace, setup: Stage2Setup, estimators: nn.ModuleDict) -> Run:
    """The stage-2 run the flags describe: Adam on the estimators (``--lr-mi``, ``--lr-milestones``,
    ``--lr-gamma``), selecting by epoch number, as ``fit_estimators`` rewrites the files every epoch."""
    optimizer, scheduler = adam(estimators, args.lr_mi, args.lr_milestones, args.lr_gamma)
    return training_run(args, {"estimators": estimators}, optimizer, scheduler, setup.generator, setup.held_out,
                        select_by="epoch")
