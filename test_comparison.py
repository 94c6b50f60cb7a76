"""Compare trained models under the paper's attacks (PAPER.md §7): accuracy (%) per attack.

Prints a Markdown table (one row per model: clean, each attack, and the per-example worst
case over all attacks) and writes it as JSON (--out) and Markdown (--md). Every attack runs
on the same first --n-examples test images. With --surrogate the attacks are crafted on the
surrogate and only transferred to the models (black-box). Trust checks warn on stderr. Under
torchrun each process evaluates a block of whole batches and the first one writes the results."""
import argparse
import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

from models import MODEL_NAMES
from models.custom import build_model, normalized, parse_normalization
from utils.attacks.autoattack import VERSIONS as AA_VERSIONS
from utils.attacks.autoattack import StateMismatch
from utils.attacks.registry import GROUPS, expand_attack_names
from utils.cli import (
    TF32_HELP,
    Parser,
    add_compile_backend_arg,
    add_data_args,
    add_normalize_arg,
    arch_spec,
    check_positive,
    linf_budget_problem,
    number,
)
from utils.evaluation import api
from utils.evaluation.output import (
    attack_settings,
    examples_text,
    format_epsilon,
    plot_sweep,
    results_json,
    results_table,
    robustbench_claims,
    sweep_table,
)
from utils.evaluation.results import Report, first_examples
from utils.script import Interrupted, UserError, run_main
from utils.training import distributed
from utils.training.checkpoint import atomic_write_text, load_weights, run_config, writable_dir
from utils.training.device import resolve_device, seed_everything, set_tf32
from utils.training.fast import FastPath
from utils.training.setup import compiled

DEFAULT_ATTACKS = "pgd40,aa"
DEFAULT_ARCH = "resnet18"
DEFAULT_SURROGATE_ARCH = "vgg19"
# What --model-dir holds: stage 3 writes target_model.pth, stage 1 best_model.pth.
MODEL_DIR_FILES = ("target_model.pth", "best_model.pth")

EPILOG = f"""\
models: each --checkpoint/--model-dir adds a model; the --name and --arch that follow it
(before the next --checkpoint/--model-dir) belong to it. --name/--arch given before the
first model apply to every model. Example:
  --checkpoint std/best_model.pth --name standard --arch resnet18 \\
  --model-dir runs/namid --name NAMID
attacks: pgdK, l2-pgdK, fwaK (release FWA), fwa-fwK (Frank-Wolfe), aa, tidim, mifgsm, cw, ddn; groups
{', '.join(f'{g} = {"+".join(v)}' for g, v in GROUPS.items())}.
epsilon: without --epsilon each attack takes its norm's default (8/255 L-inf, 0.5 L2; FWA's
Wasserstein radius as the registry sets it); --epsilon sets ONE value for every attack.
CW and DDN are minimum-norm attacks and count as successful only within epsilon."""


class _AddModel(argparse.Action):
    """--checkpoint / --model-dir: start a new model entry."""

    def __call__(self, parser, namespace, value, option_string=None):
        models = list(getattr(namespace, "models", None) or [])
        models.append({"flag": self.option_strings[0], "path": value, "name": None, "arch": None,
                       "normalize": None})
        namespace.models = models


class _ModelField(argparse.Action):
    """--name / --arch / --normalize: set on the latest model, or as the default before any model."""

    def __call__(self, parser, namespace, value, option_string=None):
        models = getattr(namespace, "models", None)
        if models:
            if models[-1][self.dest] is not None:
                parser.error(f"{option_string} given twice for {models[-1]['flag']} {models[-1]['path']}")
            models[-1][self.dest] = value
            return
        if getattr(namespace, self.dest) is not None:
            parser.error(f"{option_string} given twice before the first --checkpoint/--model-dir")
        setattr(namespace, self.dest, value)


def _epsilon_list(text: str):
    values = [number(part) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("an empty list")
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"budgets must not be negative: {text!r}")
    return sorted(set(values))


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout; shows a default only where there is one to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" not in text and action.option_strings and action.default is not None \
                and action.default is not False and action.default is not argparse.SUPPRESS:
            text += " (default: %(default)s)"
        return text


def build_parser() -> Parser:
    p = Parser(description=__doc__.splitlines()[0], epilog=EPILOG, formatter_class=_Formatter)
    # Models.
    p.add_argument("--model-dir", dest="models", action=_AddModel, default=None, metavar="DIR",
                   help=f"evaluate DIR/{MODEL_DIR_FILES[0]}, or DIR/{MODEL_DIR_FILES[1]} when the former is absent "
                        "(repeatable)")
    p.add_argument("--checkpoint", dest="models", action=_AddModel, metavar="PATH",
                   help="evaluate this state_dict (repeatable)")
    p.add_argument("--name", action=_ModelField, default=None, metavar="LABEL",
                   help="label of the preceding model in the table (default: its file stem or folder name)")
    p.add_argument("--arch", action=_ModelField, default=None, type=arch_spec, metavar="ARCH",
                   help=f"architecture of the preceding model, one of {', '.join(MODEL_NAMES)}, or "
                        "module.path:callable (imported from the working directory or PYTHONPATH, called with "
                        "num_classes) "
                        f"(default: the arch in the run's config.json beside the checkpoint, else {DEFAULT_ARCH})")
    add_normalize_arg(p, action=_ModelField)
    p.add_argument("--surrogate", default=None, metavar="PATH",
                   help="black-box transfer: craft every attack on this model and evaluate the models on the "
                        "result; the models are never asked for a gradient")
    p.add_argument("--surrogate-arch", default=None, type=arch_spec, metavar="ARCH",
                   help=f"architecture of --surrogate, as --arch (default: {DEFAULT_SURROGATE_ARCH}, the paper's)")
    # Attacks.
    p.add_argument("--attacks", default=DEFAULT_ATTACKS,
                   help="comma list of attacks or groups; the default is the paper's PGD-40 and AutoAttack at "
                        "L-inf 8/255, 'all' runs the whole suite of its §7")
    p.add_argument("--epsilon", type=number, default=None,
                   help="ONE budget for every attack, e.g. 8/255 (default: per attack, 8/255 L-inf, 0.5 L2)")
    p.add_argument("--aa-version", default="standard", choices=[v for v in AA_VERSIONS if v != "custom"],
                   help="AutoAttack version: standard (the paper's), plus, rand, release (40 iterations)")
    p.add_argument("--aa-state", default=None, metavar="DIR",
                   help="keep AutoAttack's progress per model and batch in DIR; the same command run again "
                        "(after a kill or Ctrl-C) resumes it: finished sub-attacks are read back, not repeated")
    p.add_argument("--eps-sweep", type=_epsilon_list, default=None, metavar="EPS_LIST",
                   help="also measure accuracy at each of these budgets, e.g. 0,2/255,4/255,8/255,16/255, "
                        "and plot it against epsilon")
    p.add_argument("--sweep-attacks", default=None,
                   help="attacks for --eps-sweep, all of one norm (default: those of --attacks with an Lp budget "
                        "and the norm of the first of them, except aa, which is slow)")
    p.add_argument("--plot", default=None, metavar="FILE",
                   help="PNG for --eps-sweep (default: <out stem>_eps_sweep.png next to --out, else eps_sweep.png)")
    # Data and run.
    add_data_args(p, selects=False)
    p.add_argument("--n-examples", type=int, default=None,
                   help="evaluate the first N test images, in order (default: the whole test split; "
                        "--test-limit instead takes a seeded random subset, before --n-examples)")
    p.add_argument("--batch-size", type=int, default=256, help="examples per attack batch")
    p.add_argument("--seed", type=int, default=0,
                   help="reseeded before every batch of every attack (seed + a multiple of the batch's index), so "
                        "no result depends on what ran before it, nor on the number of torchrun processes")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda when available")
    p.add_argument("--out", default=None, metavar="FILE", help="write the results, settings and timings as JSON")
    p.add_argument("--amp", action="store_true",
                   help="bf16 autocast for the models' forward passes (attack losses and gradients stay fp32); "
                        "off by default so reported numbers are exact fp32 numbers")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format for the models")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    add_compile_backend_arg(p)
    p.add_argument("--no-cudnn-benchmark", action="store_true", help="turn off cudnn.benchmark (on by default on CUDA)")
    p.add_argument("--tf32", action="store_true", help=TF32_HELP)
    p.add_argument("--md", default=None, metavar="FILE", help="also write the Markdown tables to FILE")
    p.add_argument("--robustbench-json", default=None, metavar="FILE",
                   help="also write one RobustBench claim per model (clean_acc, autoattack_acc, eps, threat_model, "
                        "...) from the table's numbers; needs aa in --attacks and a white-box evaluation")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if not args.models:
        p.error("no model to evaluate: give --model-dir DIR or --checkpoint PATH")
    if args.surrogate_arch is not None and args.surrogate is None:
        p.error("--surrogate-arch needs --surrogate")
    check_positive(p, args, "batch_size", "n_examples", "epsilon")
    try:
        args.attack_names = expand_attack_names(args.attacks)
        args.sweep_names = expand_attack_names(args.sweep_attacks) if args.sweep_attacks else None
    except ValueError as err:
        p.error(str(err))
    if not args.attack_names:
        p.error("--attacks names no attack")
    if args.sweep_attacks is not None and args.eps_sweep is None:
        p.error("--sweep-attacks needs --eps-sweep")
    if args.plot is not None and args.eps_sweep is None:
        p.error("--plot draws the --eps-sweep curves: it needs --eps-sweep")
    if args.robustbench_json is not None and "aa" not in args.attack_names:
        p.error("--robustbench-json reports AutoAttack's accuracy: it needs aa in --attacks")
    if args.robustbench_json is not None and args.surrogate is not None:
        p.error("--robustbench-json: a transferred attack is no RobustBench claim; leave out --surrogate")
    if args.aa_state is not None and "aa" not in args.attack_names + (args.sweep_names or []):
        p.error("--aa-state keeps AutoAttack's progress: it needs aa in --attacks or --sweep-attacks")
    return args


def build_attacks(names, args):
    return api.build_attacks(names, args.epsilon, args.aa_version, args.seed)


def sweep_attacks(args, attacks):
    """The attacks of the ε sweep: explicit, or the table's Lp attacks of one norm (not aa)."""
    if args.eps_sweep is None:
        return []
    if args.sweep_names:
        chosen = build_attacks(args.sweep_names, args)
    else:
        lp = [a for a in attacks if a.budget in ("linf", "l2") and a.name != "aa"]
        chosen = [a for a in lp if a.norm == lp[0].norm] if lp else []
        if not chosen:
            raise UserError("--eps-sweep: no attack of --attacks has an Lp budget to sweep (aa is left out "
                            "as too slow); name them with --sweep-attacks")
    if any(a.budget == "wasserstein" for a in chosen):
        raise UserError("--sweep-attacks: FWA's budget is a Wasserstein radius, not on the scale of an Lp sweep")
    if len({a.norm for a in chosen}) > 1:
        raise UserError("--sweep-attacks: " + ", ".join(f"{a.name} ({a.norm})" for a in chosen)
                        + " measure epsilon in different norms; sweep one norm at a time")
    return chosen


def resolve_models(args):
    """One dict per model (name, arch, path, flag), --model-dir resolved to its file, names unique."""
    out = []
    for m in args.models:
        path = Path(m["path"])
        if m["flag"] == "--model-dir":
            if not path.is_dir():
                raise UserError(f"--model-dir: {path} is not a directory")
            found = [path / f for f in MODEL_DIR_FILES if (path / f).is_file()]
            if not found:
                raise UserError(f"--model-dir: neither {' nor '.join(str(path / f) for f in MODEL_DIR_FILES)} exists")
            file = found[0]
            default_name = path.resolve().name
        else:
            file = path
            default_name = path.stem
        # No --arch given: the one the run was trained with, as its config.json recorded it.
        config = run_config(file.parent)
        arch = m["arch"] or args.arch or config.get("arch") or DEFAULT_ARCH
        # A run trained with --normalize is evaluated through the same normalisation.
        normalize = m["normalize"] or args.normalize or config.get("normalize")
        out.append({"name": m["name"] or args.name, "default": default_name, "arch": arch, "normalize": normalize,
                    "path": file, "flag": m["flag"], "given": str(m["path"])})
    stems = [m["default"] for m in out]
    for m in out:
        if m["name"] is None:
            # File stems such as best_model clash between runs; then the path says which is which.
            m["name"] = m["default"] if stems.count(m["default"]) == 1 else m["given"]
    names = [m["name"] for m in out]
    for name in names:
        if names.count(name) > 1:
            raise UserError(f"--name: two models are called {name!r}; label each with --name")
    return out


def load_model(arch, path, flag, info, device, arch_flag="--arch", normalize=None):
    """``arch`` with the weights of ``path``, normalising its inputs as ``normalize`` (a --normalize text) says."""
    try:
        model = build_model(arch, num_classes=info.num_classes, in_channels=info.in_channels)
    except ValueError as err:
        raise UserError(f"{arch_flag}: {err}") from None
    what = f"{arch_flag} {arch} ({info.num_classes} classes, {info.in_channels} channels)"
    trained = run_config(Path(path).parent).get("arch")
    if trained and trained != arch:
        what += f"; its run's config.json says --arch {trained}"
    load_weights(model, path, flag, what, arch_flag)
    try:
        model = normalized(model, parse_normalization(normalize) if normalize else None, info.in_channels)
    except ValueError as err:
        raise UserError(f"--normalize (for {flag} {path}): {err}") from None
    return model.to(device).eval()


def versions():
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("pyautoattack", "numpy"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                           capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def caption(args, n, dataset, attacks, surrogate_arch):
    eps = ", ".join(f"{a.name} {format_epsilon(a.epsilon, a.norm)} ({a.budget})" for a in attacks)
    mode = (f"black-box, crafted on the surrogate {surrogate_arch} ({args.surrogate})" if args.surrogate
            else "white-box")
    return (f"Accuracy (%) on the {examples_phrase(args, n)} of {dataset}; {mode}. ε: {eps}. "
            "Worst case: correct under every attack, per example.")


def examples_phrase(args, n: int) -> str:
    return examples_text(str(n), [args.test_limit])


def default_plot_path(args) -> Path:
    if args.plot:
        return Path(args.plot)
    if args.out:
        out = Path(args.out)
        return out.with_name(out.stem + "_eps_sweep.png")
    return Path("eps_sweep.png")


def checked_attacks(args):
    """(the table's attacks, the sweep's), or a UserError naming the flag that cannot be meant."""
    try:
        attacks = build_attacks(args.attack_names, args)
    except ValueError as err:
        raise UserError(f"--attacks: {err}") from None
    sweeps = sweep_attacks(args, attacks)
    problems = [linf_budget_problem(a.epsilon, "--epsilon") for a in attacks if a.norm == "linf"]
    if any(a.norm == "linf" for a in sweeps):
        problems += [linf_budget_problem(e, "--eps-sweep") for e in args.eps_sweep]  # the first bad one is named
    for problem in filter(None, problems):
        raise UserError(problem)
    return attacks, sweeps


def check_output_paths(args, sweeps) -> None:
    """Refuse an output path that cannot be written before the evaluation, not after it."""
    paths = [("--out", args.out), ("--md", args.md), ("--robustbench-json", args.robustbench_json)]
    if sweeps:
        paths.append(("--plot", default_plot_path(args)))
    if args.aa_state is not None:
        if Path(args.aa_state).is_file():
            raise UserError(f"--aa-state: {args.aa_state} is a file; give a folder")
        writable_dir(args.aa_state, "--aa-state")
    for flag, path in paths:
        if path is None:
            continue
        if Path(path).is_dir():
            raise UserError(f"{flag}: {path} is a folder; give a file name")
        writable_dir(Path(path).parent, flag)


def main(argv=None):
    args = parse_args(argv)
    attacks, sweeps = checked_attacks(args)
    check_output_paths(args, sweeps)
    specs = resolve_models(args)
    if args.surrogate and not Path(args.surrogate).is_file():
        raise UserError(f"--surrogate: no checkpoint at {args.surrogate}")

    from utils.data.loaders import load_splits  # torchvision is slow to import; --help and flag errors need none of it

    ctx = distributed.init(args.device)
    device = distributed.device_for(resolve_device(args.device))
    seed_everything(args.seed)
    splits, info = load_splits(args.dataset, args.data_dir, train_limit=args.train_limit,
                               test_limit=args.test_limit, val_size=args.val_size, seed=args.seed)
    test = splits["test"]
    if args.n_examples is not None and args.n_examples > len(test):
        raise UserError(f"--n-examples {args.n_examples} exceeds the {len(test)} test images of {info.name}")
    split = first_examples(test, args.n_examples)

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
        set_tf32(args.tf32)

    def fast(model):
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return compiled(model, args.compile_backend) if args.compile else model

    targets = {s["name"]: fast(load_model(s["arch"], s["path"], s["flag"], info, device, normalize=s["normalize"]))
               for s in specs}
    surrogate_arch = args.surrogate_arch or DEFAULT_SURROGATE_ARCH
    surrogate_normalize = run_config(Path(args.surrogate).parent).get("normalize") if args.surrogate else None
    surrogate = (fast(load_model(surrogate_arch, args.surrogate, "--surrogate", info, device, "--surrogate-arch",
                                 surrogate_normalize))
                 if args.surrogate
                 else None)

    report = Report(echo=ctx.is_main)  # the other processes' warnings reach the first one's report
    if args.epsilon is not None and len({a.norm for a in attacks}) > 1:
        report.warn(f"--epsilon {args.epsilon:.4g} applies to L-inf and L2 attacks alike; "
                    "the budgets of the two norms differ by an order of magnitude")
    try:
        with FastPath(amp=args.amp).autocast(device):
            ordered = api.run_evaluation(targets, split, attacks, sweeps=sweeps, epsilons=args.eps_sweep or (),
                                         batch_size=args.batch_size, device=device, surrogate=surrogate,
                                         seed=args.seed, progress=not args.no_progress and ctx.is_main,
                                         report=report, aa_state=args.aa_state)
    except StateMismatch as err:
        raise UserError(f"--aa-state: {err}") from None
    except KeyboardInterrupt:
        if args.aa_state is None:
            raise
        raise Interrupted(f"interrupted; no result file was written. AutoAttack's progress is in {args.aa_state}: "
                          "run the same command again to resume it") from None
    if not ctx.is_main:
        return

    text = results_table(ordered, [a.name for a in attacks]) + "\n\n" + caption(
        args, len(split), info.name, attacks, surrogate_arch) + "\n"
    plot = None
    if sweeps:
        text += "\nAccuracy (%) against ε:\n\n" + sweep_table(ordered, sweeps) + "\n"
        plot = plot_sweep(ordered, sweeps, default_plot_path(args), f"{info.name}, {examples_phrase(args, len(split))}")
    sys.stdout.write(text)
    sys.stdout.flush()
    if args.md:
        atomic_write_text(args.md, text)
    if args.robustbench_json:
        claims = robustbench_claims(ordered, next(a for a in attacks if a.name == "aa"),
                                    {s["name"]: s["arch"] for s in specs}, args.dataset, args.aa_version)
        atomic_write_text(args.robustbench_json, json.dumps(claims, indent=2) + "\n")
    if args.out:
        info_by_name = {s["name"]: {"arch": s["arch"], "checkpoint": str(s["path"]), "normalize": s["normalize"]}
                        for s in specs}
        payload = {
            "settings": {
                "dataset": info.name, "data_dir": args.data_dir, "n_examples": len(split),
                "examples": "first N of the test split" + (" (after --test-limit)" if args.test_limit else ""),
                "test_limit": args.test_limit, "batch_size": args.batch_size, "seed": args.seed,
                "device": str(device), "processes": ctx.world_size, "tf32": args.tf32,
                "mode": "transfer" if surrogate is not None else "white-box",
                "surrogate": ({"checkpoint": args.surrogate, "arch": surrogate_arch, "normalize": surrogate_normalize}
                              if surrogate is not None
                              else None),
                "aa_version": args.aa_version, "aa_state": args.aa_state, "epsilon_flag": args.epsilon,
                "seconds": "wall time per model and attack; in transfer mode each attack is crafted once on the "
                           "surrogate and that time is included in every model's",
                "attacks": attack_settings(attacks),
                "eps_sweep": ({"epsilons": args.eps_sweep,
                               "attacks": {a.name: {"norm": a.norm, "minimum_norm": a.minimum_norm} for a in sweeps},
                               "plot": str(plot)} if sweeps else None),
                "versions": versions(), "argv": list(sys.argv[1:] if argv is None else argv),
            },
            **results_json(ordered, attacks, info_by_name, sweeps),
            "warnings": list(report.messages),
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    run_main(main, interrupted="interrupted; no result file was written")
