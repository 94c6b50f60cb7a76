"""Figures of the project: every PNG is written atomically, and a run's curves are redrawn
from its metrics.jsonl at the end of each epoch."""
import math
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

from utils.training.balance import BALANCE_LIMIT
from utils.training.checkpoint import atomic_write


def pyplot():
    """matplotlib's pyplot on the Agg backend: training machines have no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi: int = 100) -> Path:
    """Write ``fig`` as PNG atomically (a reader, or a crash, never sees half a picture), then close it."""
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi), binary=True)
    finally:
        pyplot().close(fig)
    return Path(path)


# Stage 3's gradient balance (median and maximum over the measured batches, and what reaches
# the optimizer under --mi-grad-clip), on a log scale with the default warning line.
BALANCE_PANEL = "‖∇θ α·L_mi‖ / ‖∇θ L_adv‖"

# Which metrics.jsonl keys share a panel: every stage fills the first two, stage 3 the cosine
# terms of L_mi, stage 2 the Fig. 4 values (or WMIM's standard MI) of each epoch.
PANELS: Tuple[Tuple[str, Callable[[str], bool]], ...] = (
    ("loss", lambda k: "loss" in k or k in ("l_adv", "l_mi", "lam_term")),
    ("accuracy (%)", lambda k: k.endswith("_acc")),
    ("cosine term of L_mi", lambda k: k.startswith("cos_")),
    ("mean MI estimate", lambda k: k.startswith(("natural_mi_", "adversarial_mi_", "standard_mi_"))),
    (BALANCE_PANEL, lambda k: k.startswith("grad_ratio")),
    ("cos(∇θ L_adv, ∇θ α·L_mi)", lambda k: k == "grad_cos"),
)
Series = Dict[str, Tuple[List[int], List[float]]]


def curve_panels(records: Sequence[dict]) -> List[Tuple[str, Series]]:
    """Group the numeric per-epoch values of ``records`` by panel: [(title, {key: (epochs, values)})].

    A value that is missing or null in an epoch (a mean over an empty set) leaves a gap; a
    panel without any value is left out."""
    panels = []
    for title, belongs in PANELS:
        series: Series = {}
        for record in records:
            for key, value in record.items():
                if not belongs(key) or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if not math.isfinite(value):
                    continue
                epochs, values = series.setdefault(key, ([], []))
                epochs.append(record["epoch"])
                values.append(float(value))
        if series:
            panels.append((title, series))
    return panels


def plot_curves(records: Sequence[dict], path, title: str = "") -> Path:
    """One panel per group of :data:`PANELS`, one line per metric, against the epoch; a dotted
    line marks the last epoch whose model was kept as the best."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    panels = curve_panels(records)
    columns = max(len(panels), 1)
    fig, axes = plt.subplots(1, columns, figsize=(4.6 * columns, 3.4), squeeze=False)
    chosen = [r["epoch"] for r in records if r.get("best")]
    for ax, (name, series) in zip(axes[0], panels):
        for key, (epochs, values) in series.items():
            ax.plot(epochs, values, marker="o", markersize=3, label=key)
        if chosen:
            ax.axvline(chosen[-1], color="grey", linestyle=":", linewidth=1)
        if name == BALANCE_PANEL:
            if all(v > 0 for _, values in series.values() for v in values):  # 0 when W was empty
                ax.set_yscale("log")
            ax.axhline(BALANCE_LIMIT, color="tab:red", linestyle="--", linewidth=1, label="warning above")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    if title:
        fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    return save_figure(fig, path)
