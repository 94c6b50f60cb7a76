"""One command for the whole pipeline: stage 1 → stage 2 → stage 3 → evaluation → report.md.

Each stage runs the top-level script in this process with the checkpoints of the stage
before. A stage whose outputs are complete is skipped, and one that was interrupted goes on
with --resume, so running the same command again picks up where it stopped.

Any flag of the underlying scripts can be given after the pipeline's own flags; it goes to
every stage whose script knows it (``--epochs 3`` reaches all three training stages). For a
single stage, use --stage1-args / --stage2-args / --stage3-args / --eval-args / --sweep-args "…"."""
import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import test_comparison
import train_MI_estimator
import train_MI_estimator_only_max
import train_MIAT
import train_standard
from utils.cli import Parser
from utils.data.files import DEBIAN_FASHION_DIR, find_idx_dir
from utils.evaluation.report import GROUP_SUFFIX, merge_results, results_markdown, write_report
from utils.script import Collapsed, UserError, run_main
from utils.training.checkpoint import atomic_write_text, load_checkpoint, metrics_records, run_config, writable_dir

METHODS = ("namid", "namid-t", "namid-m", "wmim")

PAPER_SWEEP = ["--attacks", "pgd40", "--n-examples", "1000", "--eps-sweep", "0,2/255,4/255,8/255,12/255,16/255"]


def demo_dataset(data_dir: str) -> str:
    """Real Fashion-MNIST when its files are on this machine, synthetic data otherwise."""
    dirs = [Path(data_dir), Path(data_dir) / "FashionMNIST" / "raw", DEBIAN_FASHION_DIR]
    return "fashion-mnist" if find_idx_dir(dirs) else "synthetic"


def preset(name: str, data_dir: str) -> Dict[str, List[str]]:
    """Flags of each stage for a preset; "common" goes to every stage."""
    if name == "demo":
        dataset = demo_dataset(data_dir)
        common = ["--dataset", dataset, "--data-dir", data_dir, "--arch", "smallcnn", "--epsilon", "0.1",
                  "--train-limit", "2000", "--test-limit", "500", "--va-hsize", "256"]
        train = ["--epochs", "3", "--warm-up-epochs", "1", "--batch-size", "64", "--lr", "0.05",
                 "--lr-milestones", "3", "--num-steps", "5", "--eval-steps", "10"]
        # α = 5 (the paper's) makes the MI gradient ~50× the CE gradient on SmallCNN and the demo
        # collapses to chance; README "Results at CPU scale" has the measurement.
        return {"common": common, "stage1": train, "stage3": [*train, "--alpha", "0.1"],
                "stage2": ["--epochs", "2", "--batch-size", "200", "--num-steps", "5",
                           "--lr-milestones", "1"],
                # AutoAttack takes several minutes per model on a CPU: add it with --eval-args "--attacks pgd40,aa".
                "eval": ["--attacks", "pgd40,mifgsm,fwa40", "--n-examples", "200"],
                "sweep": ["--attacks", "pgd20", "--n-examples", "200", "--eps-sweep", "0,0.05,0.1,0.15,0.2"]}
    if name == "fashion-mnist":
        # The committed CPU-scale reproduction (results/fashion-mnist/): a 6,000-image training subset,
        # 6 epochs; evaluation on the full 10,000-image test set. α = 0.1 for the reason of the demo.
        common = ["--dataset", "fashion-mnist", "--data-dir", data_dir, "--arch", "smallcnn", "--epsilon", "0.1",
                  "--train-limit", "6500", "--val-size", "500", "--va-hsize", "512", "--channels-last"]
        train = ["--epochs", "6", "--warm-up-epochs", "1", "--batch-size", "100", "--lr", "0.05",
                 "--lr-milestones", "5", "--num-steps", "10", "--eval-steps", "10"]
        return {"common": common, "stage1": train, "stage3": [*train, "--alpha", "0.1"],
                "stage2": ["--epochs", "4", "--batch-size", "200", "--num-steps", "10", "--lr-milestones", "3"],
                "eval": ["--attacks", "pgd40", "--batch-size", "500"],
                "sweep": ["--attacks", "pgd20", "--n-examples", "1000", "--batch-size", "500",
                          "--eps-sweep", "0,0.05,0.1,0.15,0.2"]}
    if name == "paper-cifar10":
        return {"common": ["--dataset", "cifar10", "--data-dir", data_dir, "--arch", "resnet18"],
                "stage1": [], "stage2": [], "stage3": [], "eval": ["--attacks", "all-linf"], "sweep": PAPER_SWEEP}
    if name == "release":
        # What the authors' release ran (PAPER.md §5–7, §10), on the paper's network: stage 2 on L2
        # ε 0.5 with 20 steps of ε/20·2 (its Eq. 4 variant on L∞ 0.031, 20 steps of 0.007), stage 3
        # with 40 steps of 0.007 after 2 clean epochs and the loss without λ, models picked on the
        # test split by PGD-40, and every --release-* quirk.
        return {"common": ["--dataset", "cifar10", "--data-dir", data_dir, "--arch", "resnet18", "--val-size", "0"],
                "stage1": [],
                "stage2": ["--distance", "l_2", "--epsilon", "0.5", "--num-steps", "20", "--step-size", "0.05",
                           "--release-compat"],
                "stage2_max": ["--epsilon", "0.031", "--num-steps", "20", "--step-size", "0.007", "--release-compat"],
                "stage3": ["--num-steps", "40", "--eval-steps", "40", "--step-size", "0.007", "--warm-up-epochs", "2",
                           "--release-loss", "--release-compat"],
                "eval": ["--attacks", "all-linf"], "sweep": PAPER_SWEEP}
    if name == "paper-tinyimagenet":
        return {"common": ["--dataset", "tiny-imagenet", "--data-dir", data_dir, "--arch", "resnet18"],
                "stage1": [], "stage2": [], "stage3": [], "eval": ["--attacks", "all-linf"], "sweep": PAPER_SWEEP}
    raise UserError(f"--preset: unknown preset {name!r}")


def route(extra: List[str], module) -> List[str]:
    """The flags of ``extra`` (with their values) that ``module``'s parser knows."""
    known = module.build_parser().flags
    routed, keep = [], False
    for token in extra:
        if token.startswith("--"):
            keep = token.split("=", 1)[0] in known
        if keep:
            routed.append(token)
    return routed


def check_overrides(extra: List[str], modules) -> None:
    after_flag = False
    for token in extra:
        flag = token.split("=", 1)[0]
        if token.startswith("--"):
            if not any(flag in m.build_parser().flags for m in modules):
                raise UserError(f"{flag}: no stage of the pipeline knows this flag")
            after_flag = "=" not in token
            continue
        if not after_flag or (token.startswith("-") and not _is_number(token)):
            raise UserError(f"{token!r}: not a flag of any stage, nor the value of one (flags start with --)")
        # a value; a flag taking several values (--lr-milestones 75 90) keeps after_flag on


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class Step(NamedTuple):
    """One training stage of the pipeline: its label, script, preset section, run folder, the file
    that marks it complete, and its own flags."""
    label: str
    module: object
    stage: str
    model_dir: Path
    output: str
    specific: Tuple[str, ...]


class Pipeline:
    def __init__(self, args, extra: List[str]):
        self.args = args
        self.out = Path(args.out_dir or f"runs/{args.preset}")
        self.flags = preset(args.preset, args.data_dir)
        self.extra = extra
        self.log: List[Tuple[str, str, str]] = []  # the rows of report.md's stage table
        self.steps: List[Step] = []
        self.commands: List[tuple] = []  # (script, argv) of every stage this invocation runs

    def argv(self, module, stage: str, *specific: str) -> List[str]:
        per_stage = split_flags(getattr(self.args, f"{stage}_args"), f"--{stage}-args")
        common = route(self.flags["common"], module)
        preset_flags = self.flags[stage]
        if module is train_MI_estimator_only_max and "stage2_max" in self.flags:
            preset_flags = self.flags["stage2_max"]
        return [*common, *preset_flags, *specific, *route(self.extra, module), *per_stage]

    def add(self, label: str, module, stage: str, model_dir: Path, output: str, *specific: str) -> Path:
        self.steps.append(Step(label, module, stage, model_dir, output, specific))
        return model_dir / output

    def run_stage(self, index: int, step: Step) -> None:
        label, module, stage, model_dir, output, specific = step
        argv = self.argv(module, stage, *specific, "--model-dir", str(model_dir))
        parsed = module.parse_args(argv)
        check_seed(model_dir, parsed.seed)
        state = stage_state(model_dir, output, parsed.epochs)
        name = Path(module.__file__).name
        head = f"[pipeline {index}/{len(self.steps) + 1}] {label}: {name}"
        if state == "done":
            print(f"{head} already complete in {model_dir}, skipped", flush=True)
            self.note(label, name, argv, "complete before, skipped")
            return
        if state == "resume":
            argv.append("--resume")
        elif state == "replace":
            argv.append("--overwrite")
        print(f"{head} -> {model_dir}{' (resuming)' if state == 'resume' else ''}", flush=True)
        self.commands.append((name, argv))
        if self.args.dry_run:
            return
        began = time.time()
        try:
            module.main(argv)
        except Collapsed as err:
            raise Collapsed(f"{label} ({name}, {model_dir}): {err}") from None
        self.note(label, name, argv, f"{'resumed' if state == 'resume' else 'ran'}, {time.time() - began:.0f} s")

    def note(self, label: str, script: str, argv: List[str], what: str) -> None:
        """A row of report.md's stage table: every stage's full command, and what this invocation did."""
        self.log.append((label, f"`{script} {' '.join(shlex.quote(str(a)) for a in argv)}`", what))

    def eval_argv(self, *specific: str, sweep: bool = False) -> List[str]:
        """Preset flags, then the user's, then the models: user flags win, and an --arch of theirs is
        a default for every model (test_comparison ties an --arch after a model to that model).
        --eval-args reach the per-model runs, --sweep-args the sweep."""
        preset_flags = self.flags["sweep"] if sweep else self.flags["eval"]
        user = [*route(self.extra, test_comparison),
                *(split_flags(self.args.sweep_args, "--sweep-args") if sweep
                  else split_flags(self.args.eval_args, "--eval-args"))]
        common = route(self.flags["common"], test_comparison)
        if "--arch" in user:
            common = drop_flag(common, "--arch")
        return [*common, *preset_flags, *user, *specific]

    def check_eval_flags(self) -> None:
        """Refuse bad --eval-args / --sweep-args before any training, not after hours of it."""
        for sweep in (False, True):
            argv = self.eval_argv("--model-dir", str(self.out), sweep=sweep)
            test_comparison.checked_attacks(test_comparison.parse_args(argv))

    def evaluate(self, models: List[tuple]) -> dict:
        """One test_comparison.py run per model (eval/<dir>.json, skipped when it exists, so an
        interrupted evaluation resumes model by model), then the ε sweep, merged into results.json."""
        index = len(self.steps) + 1
        done = []
        for name, model_dir, _ in models:
            out = self.out / "eval" / f"{model_dir.name}.json"
            argv = self.eval_argv("--model-dir", str(model_dir), "--name", name, "--out", str(out))
            self.run_eval(index, f"evaluation of {name}", argv, out, [model_dir])
            done.append(out)
        sweep_out = self.out / "eval" / "eps_sweep.json"
        swept = [(name, folder) for (name, folder, in_sweep) in models if in_sweep]
        specific = [a for (name, folder) in swept for a in ("--model-dir", str(folder), "--name", name)]
        argv = [*self.eval_argv(*specific, sweep=True), "--out", str(sweep_out),
                "--plot", str(self.out / "eps_sweep.png")]
        self.run_eval(index, "ε sweep", argv, sweep_out, [folder for _, folder in swept])
        if self.args.dry_run:
            return {}
        merged = merge_results([json.loads(path.read_text()) for path in done])
        sweep = json.loads(sweep_out.read_text())
        merged["eps_sweep"] = sweep
        merged["warnings"] += [f"ε sweep: {w}" for w in sweep.get("warnings", [])]
        atomic_write_text(self.out / "results.json", json.dumps(merged, indent=2) + "\n")
        atomic_write_text(self.out / "results.md", results_markdown(merged))
        return merged

    def run_eval(self, index: int, label: str, argv: List[str], out: Path, model_dirs: List[Path]) -> None:
        head = f"[pipeline {index}/{index}] {label}: test_comparison.py"
        if not self.args.force_eval and eval_is_current(out, argv, model_dirs):
            print(f"{head}: {out} is up to date, skipped", flush=True)
            self.note(label, "test_comparison.py", argv, "up to date before, skipped")
            return
        print(f"{head} -> {out}", flush=True)
        self.commands.append(("test_comparison.py", argv))
        if self.args.dry_run:
            return
        began = time.time()
        test_comparison.main(argv)
        self.note(label, "test_comparison.py", argv, f"ran, {time.time() - began:.0f} s")


def split_flags(text: Optional[str], flag: str) -> List[str]:
    try:
        return shlex.split(text or "")
    except ValueError as err:
        raise UserError(f"{flag}: {err}") from None


def drop_flag(argv: List[str], flag: str) -> List[str]:
    """``argv`` without ``flag`` and its value."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        if token == flag:
            skip = True
            continue
        out.append(token)
    return out


DISPLAY_FLAGS = frozenset({"--no-progress", "--no_progress"})


def eval_is_current(out: Path, argv: List[str], model_dirs: List[Path]) -> bool:
    """An evaluation file counts as done when it was made by the same command and is newer than
    every checkpoint it evaluated (a stage retrained or extended since makes it stale)."""
    if not out.is_file():
        return False
    try:
        stored = json.loads(out.read_text())["settings"]["argv"]
    except (ValueError, KeyError, TypeError):
        return False
    def significant(args):  # a progress bar shown or not changes no number
        return [str(a) for a in args if str(a) not in DISPLAY_FLAGS]

    if significant(stored) != significant(argv):
        return False
    made = out.stat().st_mtime
    checkpoints = [f for d in model_dirs for f in d.glob("*.pth") if f.name != "last.pth"]
    return all(f.stat().st_mtime <= made for f in checkpoints)


def check_seed(model_dir: Path, seed: int) -> None:
    """A folder holds one seed's run: reusing it for another seed would mislabel the results."""
    stored = run_config(model_dir).get("seed")
    if stored is not None and stored != seed:
        raise UserError(f"--seeds: {model_dir} holds a run with seed {stored}, not {seed}; use another --out-dir")


def stage_state(model_dir: Path, output: str, epochs: int) -> str:
    """"done" when last.pth has reached ``epochs`` and ``output`` exists; "resume" when a last.pth
    from an earlier epoch exists; "replace" when last.pth is unreadable; "fresh" when the folder
    holds no run. A run's metrics without its last.pth is refused: it would be overwritten."""
    last = model_dir / "last.pth"
    if not last.is_file():
        if metrics_records(model_dir / "metrics.jsonl"):
            raise UserError(f"{model_dir} holds the metrics.jsonl of a run but no last.pth to resume it from "
                            "(committed results keep no checkpoints): choose another --out-dir, or delete "
                            f"{model_dir} to train that stage again")
        return "fresh"
    try:
        state = load_checkpoint(last, "last.pth")
    except UserError:  # a damaged last.pth: start the stage again
        return "replace"
    if not isinstance(state, dict):
        return "replace"
    epoch = state.get("epoch", 0)
    return "done" if epoch >= epochs and (model_dir / output).is_file() else "resume"


def seed_list(text: str) -> List[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, got {text!r}")
    return seeds


def build_parser() -> Parser:
    # No abbreviations: --seed (a stage flag) must not be taken for --seeds, nor --epoch for anything here.
    p = Parser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--preset", default="demo",
                   choices=("demo", "fashion-mnist", "paper-cifar10", "paper-tinyimagenet", "release"),
                   help="demo: a few minutes on a CPU (Fashion-MNIST or synthetic); fashion-mnist: the committed "
                        "CPU-scale reproduction (about two hours on 2 cores); paper-*: the paper's settings; "
                        "release: what the authors' release ran on CIFAR-10, its numerical quirks included")
    p.add_argument("--method", default="namid", choices=(*METHODS, "all"), help="which defenses to train")
    p.add_argument("--seeds", type=seed_list, default=[0],
                   help="comma-separated seeds for Standard AT and NAMID (stage 2 uses the first seed's model)")
    p.add_argument("--ablations", action="store_true",
                   help="also train the paper's Fig. 5 ablations of NAMID: (i) no adversarial MI, (ii) no natural MI, "
                        "(iii) λ = 0")
    p.add_argument("--out-dir", default=None, help="every stage's outputs and report.md (default runs/<preset>)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--force-eval", action="store_true", help="re-run the evaluation even if its JSON files exist")
    p.add_argument("--dry-run", action="store_true",
                   help="print the command of every stage still to run, and run nothing (to spread stages over "
                        "several machines or GPUs: each finished stage is skipped by the next run)")
    for stage in ("stage1", "stage2", "stage3", "eval", "sweep"):
        p.add_argument(f"--{stage}-args", default="", help=f"extra flags for the {stage} script only, quoted")
    return p


ABLATIONS = (("NAMID (i) no adversarial MI", "namid_no_adv_mi", "--no-adv-mi"),
             ("NAMID (ii) no natural MI", "namid_no_nat_mi", "--no-nat-mi"),
             ("NAMID (iii) λ = 0", "namid_lam0", "--lam", "0"))


def seeded(label: str, folder: str, seed: int, first: int):
    """The first seed keeps the plain name and folder; the others get " (seed s)" and "_seed<s>"."""
    if seed == first:
        return label, folder, ("--seed", str(seed))
    return f"{label}{GROUP_SUFFIX}{seed})", f"{folder}_seed{seed}", ("--seed", str(seed))


def plan(pipe: Pipeline, methods, seeds: List[int], ablations: bool) -> List[tuple]:
    """Add every stage to ``pipe`` in dependency order; return the models to evaluate as
    (name, folder, whether it appears in the ε sweep)."""
    out, first = pipe.out, seeds[0]
    first_seed = ("--seed", str(first))
    models = []
    for seed in seeds:
        label, folder, flags = seeded("Standard AT", "standard", seed, first)
        pipe.add(label, train_standard, "stage1", out / folder, "best_model.pth", *flags)
        models.append((label, out / folder, seed == first))
    target = out / "standard" / "best_model.pth"
    if any(m.startswith("namid") for m in methods):
        pipe.add("MI estimators (Eq. 5)", train_MI_estimator, "stage2", out / "mi_estimator", "global_a_model.pth",
                 "--pre-target", str(target), *first_seed)
        pipe.add("MI estimators, plain maximisation (Eq. 4)", train_MI_estimator_only_max, "stage2",
                 out / "mi_estimator_only_max", "global_a_model.pth", "--pre-target", str(target),
                 *first_seed)
    mi = ("--mi-dir", str(out / "mi_estimator"))
    for method, loss, baseline in (("namid", "ce", None), ("namid-t", "trades", "TRADES"), ("namid-m", "mart", "MART")):
        if method not in methods:
            continue
        if baseline:
            pipe.add(baseline, train_standard, "stage1", out / baseline.lower(), "best_model.pth", "--loss", loss,
                     *first_seed)
            models.append((baseline, out / baseline.lower(), True))
        for seed in seeds if method == "namid" else [first]:
            label, folder, flags = seeded(method.upper(), method.replace("-", "_"), seed, first)
            pipe.add(label, train_MIAT, "stage3", out / folder, "target_model.pth", "--adv-loss", loss, *mi,
                     *flags)
            models.append((label, out / folder, seed == first))
    if "namid" in methods and ablations:
        for label, folder, *flags in ABLATIONS:
            pipe.add(label, train_MIAT, "stage3", out / folder, "target_model.pth", "--adv-loss", "ce", *mi, *flags,
                     *first_seed)
            models.append((label, out / folder, False))
    if "wmim" in methods:
        pipe.add("standard-MI estimator (WMIM)", train_MI_estimator_only_max, "stage2", out / "mi_standard",
                 "global_std_model.pth", "--pre-target", str(target), "--standard-mi", *first_seed)
        pipe.add("WMIM", train_MIAT, "stage3", out / "wmim", "target_model.pth", "--method", "wmim",
                 "--mi-dir", str(out / "mi_standard"), *first_seed)
        models.append(("WMIM", out / "wmim", True))
    return models


def main(argv=None):
    p = build_parser()
    args, extra = p.parse_known_args(argv)
    args.command = [str(a) for a in (sys.argv[1:] if argv is None else argv)]  # for report.md
    modules = (train_standard, train_MI_estimator, train_MI_estimator_only_max, train_MIAT, test_comparison)
    check_overrides(extra, modules)
    stage_flags = [*extra, *(t for stage in ("stage1", "stage2", "stage3") for t in
                             split_flags(getattr(args, f"{stage}_args"), f"--{stage}-args"))]
    given = {token.split("=", 1)[0] for token in stage_flags}
    if "--seed" in given:
        raise UserError("--seed: use --seeds, which the pipeline hands to each stage")
    for flag in ("--resume", "--overwrite"):
        if flag in given:
            raise UserError(f"{flag}: the pipeline resumes unfinished stages itself; run the same command again")
    if args.ablations and args.method not in ("namid", "all"):
        raise UserError(f"--ablations: the ablations are of NAMID; --method {args.method} trains none")
    if args.preset == "release" and (args.ablations or args.method in ("wmim", "all")):
        raise UserError("--preset release: the release has no WMIM run and no ablations (its loss already has no "
                        "λ term); choose --method namid, namid-t or namid-m without --ablations")
    pipe = Pipeline(args, extra)
    pipe.check_eval_flags()
    out = pipe.out
    methods = METHODS if args.method == "all" else (args.method,)
    models = plan(pipe, methods, args.seeds, args.ablations)

    dataset = train_standard.parse_args(pipe.argv(train_standard, "stage1")).dataset
    print(f"[pipeline] preset {args.preset} on {dataset}"
          f"{' (Fashion-MNIST is not installed: synthetic data)' if dataset == 'synthetic' else ''}; "
          f"outputs in {out}", flush=True)
    if not args.dry_run:
        writable_dir(out, "--out-dir")
    for index, step in enumerate(pipe.steps, 1):
        pipe.run_stage(index, step)
    pipe.evaluate(models)
    if args.dry_run:
        for script, stage_argv in pipe.commands:
            print(f"python {script} {' '.join(shlex.quote(a) for a in stage_argv)}")
        return
    write_report(out, args.preset, args.command, dataset, [(s.label, s.model_dir) for s in pipe.steps], pipe.log)
    print(f"[pipeline] done: {out / 'report.md'}", flush=True)


if __name__ == "__main__":
    run_main(main, interrupted="interrupted; finished stages and evaluations are kept: run the same command "
                               "again to continue")
