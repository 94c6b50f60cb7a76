"""Flags that several scripts share, defined once.

Every ``--long-flag`` also answers to ``--long_flag`` (the release's spelling). Errors in
flags print one line and exit with status 2, as argparse does, without a usage dump."""
import argparse
import math
import sys
from fractions import Fraction
from typing import Optional

from models import MODEL_NAMES
from models.custom import NORMALIZE_PRESETS, check_arch, parse_normalization
from utils.data.loaders import DATASETS
from utils.mi.bounds import resolve_mode


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose long options accept both hyphen and underscore spellings."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names, **kwargs):
        spelled = list(names)
        for name in names:
            if name.startswith("--") and "-" in name[2:]:
                alias = "--" + name[2:].replace("-", "_")
                if alias not in spelled:
                    spelled.append(alias)
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


def add_attack_args(p: Parser, num_steps: int = 10, eval_steps: int = 20) -> None:
    p.add_argument("--distance", default="l_inf", choices=("l_inf", "l_2"), help="threat model")
    p.add_argument("--epsilon", type=number, default=None,
                   help="perturbation budget, e.g. 8/255 (default: 8/255 for l_inf, 0.5 for l_2)")
    p.add_argument("--step-size", type=number, default=None, help="PGD step size (default epsilon/4)")
    p.add_argument("--num-steps", type=int, default=num_steps, help="PGD steps while training")
    p.add_argument("--eval-steps", type=int, default=eval_steps, help="PGD steps for the per-epoch robust accuracy")


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
    try:
        args.mi_mode = resolve_mode(args.va_mode, args.va_fd_measure)
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
