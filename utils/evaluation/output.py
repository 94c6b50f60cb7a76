"""How evaluation results go out (PAPER.md §7): Markdown tables, the JSON of test_comparison.py
and the accuracy-against-ε plot."""
from pathlib import Path
from typing import Dict, Optional, Sequence

from utils.attacks.registry import Attack
from utils.evaluation.markdown import markdown_table
from utils.evaluation.results import ModelResult, accuracy
from utils.plots import pyplot, save_figure


def examples_text(n: str, test_limits: Sequence[Optional[int]]) -> str:
    """Which test images were evaluated: with --test-limit, the first N of a seeded subset."""
    limits = sorted({limit for limit in test_limits if limit})
    if limits:
        return f"first {n} of a seeded subset of {'/'.join(map(str, limits))} test images (--test-limit)"
    return f"first {n} test images"


def format_epsilon(epsilon: float, norm: str) -> str:
    """``8/255`` for L∞ budgets on the 1/255 grid, a short decimal otherwise; a budget that is a
    short decimal already (0.2, which is also 51/255) keeps that spelling."""
    short = f"{epsilon:.4g}"
    on_grid = abs(epsilon * 255 - round(epsilon * 255)) < 1e-6
    if norm == "linf" and epsilon > 0 and on_grid and float(f"{epsilon:.3g}") != epsilon:
        return f"{round(epsilon * 255)}/255"
    return short


def results_table(results: Sequence[ModelResult], attack_names: Sequence[str]) -> str:
    """One row per model: clean, each attack, worst case; accuracy in % with 2 decimals."""
    header = ["model", "clean", *attack_names, "worst case"]
    rows = []
    for r in results:
        row = r.table_row()
        rows.append([r.name, *(f"{row[k]:.2f}" for k in header[1:])])
    return markdown_table(header, rows, "l" + "r" * (len(header) - 1))


def sweep_table(results: Sequence[ModelResult], attacks: Sequence[Attack]) -> str:
    """One row per (model, attack), one column per ε."""
    epsilons = sorted({e for r in results for by_eps in r.sweep.values() for e in by_eps})
    norm = attacks[0].norm if attacks else "linf"
    header = ["model", "attack", *[f"ε={format_epsilon(e, norm) if e else '0'}" for e in epsilons]]
    rows = []
    for r in results:
        for a in attacks:
            by_eps = r.sweep.get(a.name, {})
            rows.append([r.name, a.name, *(f"{accuracy(by_eps[e]):.2f}" if e in by_eps else "" for e in epsilons)])
    return markdown_table(header, rows, "ll" + "r" * len(epsilons))


def plot_sweep(results: Sequence[ModelResult], attacks: Sequence[Attack], path, title: str = "") -> Path:
    """Accuracy (%) against ε, one panel per attack, one line per model; written as PNG."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.5 * len(attacks), 3.6), squeeze=False)
    for ax, a in zip(axes[0], attacks):
        scale = 255.0 if a.norm == "linf" else 1.0
        for r in results:
            by_eps = r.sweep.get(a.name, {})
            eps = sorted(by_eps)
            ax.plot([e * scale for e in eps], [accuracy(by_eps[e]) for e in eps], marker="o", label=r.name)
        ax.set_xlabel("ε (×1/255)" if a.norm == "linf" else f"ε ({a.norm})")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(a.name)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def attack_settings(attacks: Sequence[Attack]) -> Dict[str, dict]:
    return {a.name: {"norm": a.norm, "epsilon": a.epsilon, "budget": a.budget, "minimum_norm": a.minimum_norm}
            for a in attacks}


def results_json(results: Sequence[ModelResult], attacks: Sequence[Attack], model_info: Dict[str, dict],
                 sweep_attacks: Sequence[Attack] = ()) -> dict:
    """The numbers of the tables (full precision), counts and wall times, per model."""
    models = []
    for r in results:
        row = r.table_row()
        entry = {
            **model_info.get(r.name, {}), "name": r.name, "n": int(r.clean.numel()),
            "clean": row["clean"], "attacks": {a.name: row[a.name] for a in attacks}, "worst_case": row["worst case"],
            "correct": {"clean": int(r.clean.sum()), **{k: int(m.sum()) for k, m in r.robust.items()},
                        "worst_case": int(r.worst.sum())},
            "seconds": dict(r.seconds),
        }
        if sweep_attacks:
            entry["eps_sweep"] = {a.name: {"epsilon": sorted(r.sweep.get(a.name, {})),
                                           "accuracy": [accuracy(r.sweep[a.name][e])
                                                        for e in sorted(r.sweep.get(a.name, {}))],
                                           "seconds": [r.sweep_seconds[a.name][e]
                                                       for e in sorted(r.sweep.get(a.name, {}))]}
                                  for a in sweep_attacks}
        models.append(entry)
    return {"models": models}


# RobustBench's names of the threat models.
_THREAT_MODELS = {"linf": "Linf", "l2": "L2"}


def robustbench_claims(results: Sequence[ModelResult], aa: Attack, architectures: Dict[str, str], dataset: str,
                       aa_version: str) -> list:
    """One claim per model in the fields of RobustBench's model_info files (accuracies as strings with
    two decimals, as there), from the masks of the table; ``n_examples`` says how many test images
    the numbers rest on (RobustBench's leaderboards use the whole test set)."""
    claims = []
    for r in results:
        row = r.table_row()
        claims.append({
            "name": r.name, "dataset": dataset, "threat_model": _THREAT_MODELS[aa.norm],
            "eps": format_epsilon(aa.epsilon, aa.norm), "clean_acc": f"{row['clean']:.2f}",
            "autoattack_acc": f"{row[aa.name]:.2f}", "architecture": architectures.get(r.name),
            # The project's models train on the dataset alone and answer in one deterministic pass.
            "additional_data": False, "number_forward_passes": 1, "n_examples": int(r.clean.numel()),
            "autoattack_version": aa_version,
        })
    return claims
