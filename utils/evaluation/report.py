"""report.md and results.md of run_pipeline.py: the merged results, the paper's Table 1 beside
them, the Fig. 4 MI tables, the ε sweep, the training curves and every stage's command."""
import json
import shlex
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from utils.evaluation.markdown import markdown_table
from utils.evaluation.output import examples_text
from utils.training.checkpoint import atomic_write_text, metrics_records

# The paper's Table 1 rows (PAPER.md §8), accuracy in %: None, PGD-40, AA, FWA-40, TI-DIM.
PAPER_LINF = {
    "Standard AT": (83.39, 42.38, 39.01, 15.44, 55.63), "WMIM": (80.32, 40.76, 36.05, 12.14, 53.10),
    "NAMID": (83.41, 44.79, 39.26, 15.67, 58.23), "TRADES": (80.70, 46.29, 42.71, 20.54, 57.06),
    "NAMID-T": (80.67, 47.53, 43.39, 21.17, 59.13), "MART": (78.21, 50.23, 43.96, 25.56, 58.62),
    "NAMID-M": (78.38, 51.69, 44.42, 25.64, 61.26),
}
PAPER_TINY = {"Standard AT": (48.40, 17.35, 11.27, 10.29, 27.84), "NAMID": (48.41, 18.67, 12.29, 11.32, 29.37)}

# How run_pipeline names the runs of further seeds: "NAMID (seed 2)".
GROUP_SUFFIX = " (seed "


def group_name(name: str) -> str:
    """"NAMID (seed 2)" and "NAMID" are runs of one defense."""
    return name.split(GROUP_SUFFIX)[0]


def merge_results(parts: List[dict]) -> dict:
    """The per-model JSON files of test_comparison.py as one: settings per model, models in order."""
    models, warnings, settings = [], [], {}
    for part in parts:
        for model in part["models"]:
            models.append(model)
            settings[model["name"]] = part["settings"]
        warnings += part.get("warnings", [])
    return {"models": models, "settings": settings, "warnings": warnings}


def mean_std(values: List[float]) -> str:
    t = torch.tensor(values, dtype=torch.float64)
    return f"{t.mean():.2f}" if len(values) == 1 else f"{t.mean():.2f} ± {t.std():.2f}"


def results_markdown(merged: dict) -> str:
    """Every model's row, then the mean ± sample std over seeds of each defense with several."""
    models = merged["models"]
    attacks = list(dict.fromkeys(a for m in models for a in m["attacks"]))
    columns = ["clean", *attacks, "worst case"]

    def cells(m):
        return [m["clean"], *[m["attacks"].get(a) for a in attacks], m["worst_case"]]

    def shown(v):
        return "–" if v is None else f"{v:.2f}"

    align = "lr" + "r" * len(columns)
    lines = [markdown_table(["model", "n", *columns], [[m["name"], str(m["n"]), *map(shown, cells(m))] for m in models],
                            align)]
    groups: Dict[str, List[dict]] = {}
    for m in models:
        groups.setdefault(group_name(m["name"]), []).append(m)
    multi = {g: ms for g, ms in groups.items() if len(ms) > 1}
    if multi:
        rows = []
        for g, ms in multi.items():
            per_column = list(zip(*[cells(m) for m in ms]))
            rows.append([g, str(len(ms)), *("–" if None in col else mean_std(list(col)) for col in per_column)])
        lines += ["", "Mean ± standard deviation over seeds (accuracy %):", "",
                  markdown_table(["defense", "seeds", *columns], rows, align)]
    n = {m["n"] for m in models}
    settings = list(merged["settings"].values())
    modes = sorted({st.get("mode", "white-box") for st in settings})
    budgets = {name: a["epsilon"] for st in settings for name, a in st.get("attacks", {}).items()}
    which = examples_text("/".join(str(v) for v in sorted(n)), [st.get("test_limit") for st in settings])
    lines += ["", f"Accuracy (%) on the {which}; {', '.join(modes)}; "
              + "".join(f"{name} at ε = {eps:.4g}; " for name, eps in budgets.items())
              + "worst case: correct under every attack, per example."]
    if merged["warnings"]:
        lines += ["", "Warnings:", "", *[f"- {w}" for w in merged["warnings"]]]
    return "\n".join(lines) + "\n"


def write_report(out: Path, preset: str, command: Sequence[str], dataset: str,
                 curves: Sequence[Tuple[str, Path]], stages: Sequence[Tuple[str, str, str]]) -> None:
    """report.md in ``out``, from the files the pipeline left there: ``command`` is run_pipeline.py's
    command line, ``curves`` (label, run folder) the training runs whose curves.png to show, and
    ``stages`` the stage table's rows (stage, command, what this invocation did)."""
    lines = [f"# NAMID pipeline report: preset `{preset}`", "",
             f"Dataset: **{dataset}**. Command: `python run_pipeline.py {shlex.join(command)}`", "",
             "## Our results", "", (out / "results.md").read_text().strip(), ""]
    paper = PAPER_TINY if dataset == "tiny-imagenet" else PAPER_LINF
    setting = "Tiny-ImageNet" if dataset == "tiny-imagenet" else "CIFAR-10"
    lines += ["## The paper's Table 1 (ResNet-18, L∞ 8/255, accuracy %)", ""]
    if dataset not in ("cifar10", "tiny-imagenet"):
        lines += [f"The paper reports no {dataset} numbers; its {setting} rows are shown for reference only.", ""]
    lines += [markdown_table(["defense", "None", "PGD-40", "AA", "FWA-40", "TI-DIM"],
                             [[name, *(f"{v:.2f}" for v in row)] for name, row in paper.items()])]
    lines += ["", "## MI of natural and adversarial inputs (paper Fig. 4)", ""]
    for folder, title in (("mi_estimator", "after Eq. 5 training"), ("mi_estimator_only_max", "after Eq. 4 (MIM)")):
        png = out / folder / "mi_table.png"
        if png.exists():
            lines += [f"### {title}", "", f"![{title}]({folder}/mi_table.png)", "", mi_table_markdown(out / folder), ""]
    if (out / "eps_sweep.png").exists():
        sweep = json.loads((out / "eval" / "eps_sweep.json").read_text())
        lines += ["## Accuracy against ε", "", "![accuracy against epsilon](eps_sweep.png)", "",
                  sweep_markdown(sweep), ""]
    curves = [(label, folder.relative_to(out)) for label, folder in curves if (folder / "curves.png").exists()]
    if curves:
        lines += ["## Training curves", ""]
        for label, folder in curves:
            lines += [f"### {label}", "", f"![{label}: training curves]({folder.as_posix()}/curves.png)", ""]
    lines += ["## Stages", "", markdown_table(["stage", "command", "this invocation"], stages), ""]
    atomic_write_text(out / "report.md", "\n".join(lines))


def sweep_markdown(sweep: dict) -> str:
    """Accuracy (%) per model and attack at each ε of the sweep, from its test_comparison JSON."""
    rows = [(m["name"], attack, dict(zip(curve["epsilon"], curve["accuracy"])))
            for m in sweep["models"] for attack, curve in m.get("eps_sweep", {}).items()]
    epsilons = sorted({e for _, _, by_eps in rows for e in by_eps})
    table = markdown_table(["model", "attack", *(f"ε = {e:.4g}" for e in epsilons)],
                           [[name, attack, *(f"{by_eps[e]:.2f}" if e in by_eps else "–" for e in epsilons)]
                            for name, attack, by_eps in rows],
                           "ll" + "r" * len(epsilons))
    which = examples_text(str(sweep["settings"]["n_examples"]), [sweep["settings"].get("test_limit")])
    return table + f"\n\nOn the {which}."


def mi_table_markdown(folder: Path) -> str:
    """The last complete epoch's Fig. 4 table from stage 2's metrics.jsonl (a line torn by a crash
    is skipped; with no complete epoch at all, every cell is "–")."""
    records = metrics_records(folder / "metrics.jsonl")
    record = records[-1] if records else {}
    rows = []
    for kind in ("natural", "adversarial"):
        for inp, label in (("x", "x"), ("xadv", "x̃")):
            cells = [record.get(f"{kind}_mi_{inp}_{s}") for s in ("right", "wrong")]
            rows.append([kind, label, *("–" if c is None else f"{c:.3f}" for c in cells)])
    return markdown_table(["MI", "input", "right (R)", "wrong (W)"], rows)
