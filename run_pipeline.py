"""One command for the whole pipeline: stage 1 → stage 2 → stage 3 → evaluation → report.md.

Each stage runs the top-level script in this process with the checkpoints of the stage
before. A stage whose outputs are complete is skipped, and one that was interrupted goes on
with --resume, so running the same command again picks up where it stopped.

Any flag of the underlying scripts can be given after the pipeline's own flags; it goes to
every stage whose script knows it (``--epochs 3`` reaches all three training stages). For a
single stage, use --stage1-args / --stage2-args / --stage3-args / --eval-args "…"."""
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

import test_comparison
import train_MI_estimator
import train_MI_estimator_only_max
import train_MIAT
import train_standard
from utils.cli import Parser
from utils.data import DEBIAN_FASHION_DIR, find_idx_dir
from utils.training import UserError, atomic_write_text, run_main

METHODS = ("namid", "namid-t", "namid-m", "wmim")

# The paper's Table 1 rows (PAPER.md §8), accuracy in %: None, PGD-40, AA, FWA-40, TI-DIM.
PAPER_LINF = {
    "Standard AT": (83.39, 42.38, 39.01, 15.44, 55.63), "WMIM": (80.32, 40.76, 36.05, 12.14, 53.10),
    "NAMID": (83.41, 44.79, 39.26, 15.67, 58.23), "TRADES": (80.70, 46.29, 42.71, 20.54, 57.06),
    "NAMID-T": (80.67, 47.53, 43.39, 21.17, 59.13), "MART": (78.21, 50.23, 43.96, 25.56, 58.62),
    "NAMID-M": (78.38, 51.69, 44.42, 25.64, 61.26),
}
PAPER_TINY = {"Standard AT": (48.40, 17.35, 11.27, 10.29, 27.84), "NAMID": (48.41, 18.67, 12.29, 11.32, 29.37)}


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
                "eval": ["--attacks", "pgd40,mifgsm,fwa40", "--n-examples", "200",
                         "--eps-sweep", "0,0.05,0.1,0.15,0.2"]}
    if name == "paper-cifar10":
        return {"common": ["--dataset", "cifar10", "--data-dir", data_dir, "--arch", "resnet18"],
                "stage1": [], "stage2": [], "stage3": [],
                "eval": ["--attacks", "all-linf", "--eps-sweep", "0,2/255,4/255,8/255,12/255,16/255"]}
    if name == "paper-tinyimagenet":
        return {"common": ["--dataset", "tiny-imagenet", "--data-dir", data_dir, "--arch", "resnet18"],
                "stage1": [], "stage2": [], "stage3": [],
                "eval": ["--attacks", "all-linf", "--eps-sweep", "0,2/255,4/255,8/255,12/255,16/255"]}
    raise UserError(f"--preset: unknown preset {name!r}")


def route(extra: List[str], module) -> List[str]:
    """The flags of ``extra`` (with their values) that ``module``'s parser knows."""
    known = module.build_parser()._option_string_actions
    routed, keep = [], False
    for token in extra:
        if token.startswith("--"):
            keep = token.split("=", 1)[0] in known
        if keep:
            routed.append(token)
    return routed


def check_overrides(extra: List[str], modules) -> None:
    for token in extra:
        flag = token.split("=", 1)[0]
        if token.startswith("--") and not any(flag in m.build_parser()._option_string_actions for m in modules):
            raise UserError(f"{flag}: no stage of the pipeline knows this flag")


class Pipeline:
    def __init__(self, args, extra: List[str]):
        self.args = args
        self.out = Path(args.out_dir or f"runs/{args.preset}")
        self.flags = preset(args.preset, args.data_dir)
        self.extra = extra
        self.log: List[str] = []
        self.steps: List[tuple] = []

    def argv(self, module, stage: str, *specific: str) -> List[str]:
        per_stage = shlex.split(getattr(self.args, f"{stage}_args") or "")
        common = route(self.flags["common"], module)
        return [*common, *self.flags[stage], *specific, *route(self.extra, module), *per_stage]

    def add(self, label: str, module, stage: str, model_dir: Path, output: str, *specific: str) -> Path:
        self.steps.append((label, module, stage, model_dir, output, specific))
        return model_dir / output

    def run_stage(self, index: int, label: str, module, stage: str, model_dir: Path, output: str, specific) -> None:
        argv = self.argv(module, stage, *specific, "--model-dir", str(model_dir))
        epochs = module.parse_args(argv).epochs
        state = stage_state(model_dir, output, epochs)
        name = Path(module.__file__).name
        head = f"[pipeline {index}/{len(self.steps) + 1}] {label}: {name}"
        if state == "done":
            print(f"{head} already complete in {model_dir}, skipped", flush=True)
            return
        if state == "resume":
            argv.append("--resume")
        print(f"{head} -> {model_dir}{' (resuming)' if state == 'resume' else ''}", flush=True)
        began = time.time()
        module.main(argv)
        self.log.append(f"| {label} | `{name} {' '.join(shlex.quote(a) for a in argv)}` | {time.time() - began:.0f} |")

    def evaluate(self, models: List[tuple]) -> dict:
        results = self.out / "results.json"
        index = len(self.steps) + 1
        if results.exists() and not self.args.force_eval:
            print(f"[pipeline {index}/{index}] evaluation: {results} exists, skipped", flush=True)
            return json.loads(results.read_text())
        specific = []
        for name, arch_dir in models:
            specific += ["--model-dir", str(arch_dir), "--name", name]
        argv = [*route(self.flags["common"], test_comparison), *self.flags["eval"], *specific,
                *route(self.extra, test_comparison), *shlex.split(self.args.eval_args or ""),
                "--out", str(results), "--md", str(self.out / "results.md"), "--plot", str(self.out / "eps_sweep.png")]
        print(f"[pipeline {index}/{index}] evaluation: test_comparison.py -> {results}", flush=True)
        began = time.time()
        test_comparison.main(argv)
        self.log.append(f"| evaluation | `test_comparison.py {' '.join(shlex.quote(a) for a in argv)}` | "
                        f"{time.time() - began:.0f} |")
        return json.loads(results.read_text())


def stage_state(model_dir: Path, output: str, epochs: int) -> str:
    """"done" when last.pth has reached ``epochs`` and ``output`` exists; "resume" when a last.pth
    from an earlier epoch exists; "fresh" otherwise."""
    last = model_dir / "last.pth"
    if not last.is_file():
        return "fresh"
    try:
        epoch = torch.load(last, map_location="cpu", weights_only=True).get("epoch", 0)
    except Exception:  # a damaged last.pth: start the stage again
        return "fresh"
    return "done" if epoch >= epochs and (model_dir / output).is_file() else "resume"


def build_parser() -> Parser:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo", choices=("demo", "paper-cifar10", "paper-tinyimagenet"),
                   help="demo: a few minutes on a CPU (Fashion-MNIST or synthetic); paper-*: the paper's settings")
    p.add_argument("--method", default="namid", choices=(*METHODS, "all"), help="which defenses to train")
    p.add_argument("--out-dir", default=None, help="every stage's outputs and report.md (default runs/<preset>)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--force-eval", action="store_true", help="re-run the evaluation even if results.json exists")
    for stage in ("stage1", "stage2", "stage3", "eval"):
        p.add_argument(f"--{stage}-args", default="", help=f"extra flags for the {stage} script only, quoted")
    return p


def main(argv=None):
    p = build_parser()
    args, extra = p.parse_known_args(argv)
    modules = (train_standard, train_MI_estimator, train_MI_estimator_only_max, train_MIAT, test_comparison)
    check_overrides(extra, modules)
    pipe = Pipeline(args, extra)
    out = pipe.out
    methods = METHODS if args.method == "all" else (args.method,)
    models = [("Standard AT", out / "standard")]
    pipe.add("Standard AT", train_standard, "stage1", out / "standard", "best_model.pth")
    target = out / "standard" / "best_model.pth"
    if any(m.startswith("namid") for m in methods):
        pipe.add("MI estimators (Eq. 5)", train_MI_estimator, "stage2", out / "mi_estimator", "global_a_model.pth",
                 "--pre-target", str(target))
        pipe.add("MI estimators, plain maximisation (Eq. 4)", train_MI_estimator_only_max, "stage2",
                 out / "mi_estimator_only_max", "global_a_model.pth", "--pre-target", str(target))
    for method, loss, baseline in (("namid", "ce", None), ("namid-t", "trades", "TRADES"), ("namid-m", "mart", "MART")):
        if method not in methods:
            continue
        if baseline:
            pipe.add(baseline, train_standard, "stage1", out / baseline.lower(), "best_model.pth", "--loss", loss)
            models.append((baseline, out / baseline.lower()))
        label = method.upper()
        pipe.add(label, train_MIAT, "stage3", out / method, "target_model.pth", "--adv-loss", loss,
                 "--mi-dir", str(out / "mi_estimator"))
        models.append((label, out / method))
    if "wmim" in methods:
        pipe.add("standard-MI estimator (WMIM)", train_MI_estimator_only_max, "stage2", out / "mi_standard",
                 "global_std_model.pth", "--pre-target", str(target), "--standard-mi")
        pipe.add("WMIM", train_MIAT, "stage3", out / "wmim", "target_model.pth", "--method", "wmim",
                 "--mi-dir", str(out / "mi_standard"))
        models.append(("WMIM", out / "wmim"))

    dataset = train_standard.parse_args(pipe.argv(train_standard, "stage1")).dataset
    print(f"[pipeline] preset {args.preset} on {dataset}"
          f"{' (Fashion-MNIST is not installed: synthetic data)' if dataset == 'synthetic' else ''}; "
          f"outputs in {out}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    for index, step in enumerate(pipe.steps, 1):
        pipe.run_stage(index, *step)
    pipe.evaluate(models)
    write_report(pipe, dataset)
    print(f"[pipeline] done: {out / 'report.md'}", flush=True)


def write_report(pipe: Pipeline, dataset: str) -> None:
    out = pipe.out
    lines = [f"# NAMID pipeline report: preset `{pipe.args.preset}`", "",
             f"Dataset: **{dataset}**. Command: `python run_pipeline.py {' '.join(sys.argv[1:])}`", "",
             "## Our results", "", (out / "results.md").read_text().strip(), ""]
    paper = PAPER_TINY if dataset == "tiny-imagenet" else PAPER_LINF
    setting = "Tiny-ImageNet" if dataset == "tiny-imagenet" else "CIFAR-10"
    lines += ["## The paper's Table 1 (ResNet-18, L∞ 8/255, accuracy %)", ""]
    if dataset not in ("cifar10", "tiny-imagenet"):
        lines += [f"The paper reports no {dataset} numbers; its {setting} rows are shown for reference only.", ""]
    lines += ["| defense | None | PGD-40 | AA | FWA-40 | TI-DIM |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for name, row in paper.items()]
    lines += ["", "## MI of natural and adversarial inputs (paper Fig. 4)", ""]
    for folder, title in (("mi_estimator", "after Eq. 5 training"), ("mi_estimator_only_max", "after Eq. 4 (MIM)")):
        png = out / folder / "mi_table.png"
        if png.exists():
            lines += [f"### {title}", "", f"![{title}]({folder}/mi_table.png)", "", mi_table_markdown(out / folder), ""]
    if (out / "eps_sweep.png").exists():
        lines += ["## Accuracy against ε", "", "![accuracy against epsilon](eps_sweep.png)", ""]
    lines += ["## Stages run in this invocation", "", "| stage | command | seconds |", "|---|---|---|", *pipe.log, ""]
    atomic_write_text(out / "report.md", "\n".join(lines))


def mi_table_markdown(folder: Path) -> str:
    """The last epoch's Fig. 4 table from stage 2's metrics.jsonl."""
    lines = [ln for ln in (folder / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    record = json.loads(lines[-1])
    rows = ["| MI | input | right (R) | wrong (W) |", "|---|---|---|---|"]
    for kind in ("natural", "adversarial"):
        for inp, label in (("x", "x"), ("xadv", "x̃")):
            cells = [record.get(f"{kind}_mi_{inp}_{s}") for s in ("right", "wrong")]
            rows.append(f"| {kind} | {label} | " + " | ".join("–" if c is None else f"{c:.3f}" for c in cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    run_main(main)
