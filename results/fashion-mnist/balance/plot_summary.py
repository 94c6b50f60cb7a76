"""Draw summary.png from summary.json: clean and PGD-40 accuracy of every arm, one dot per seed.

    python results/fashion-mnist/balance/plot_summary.py
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from utils.plots import pyplot, save_figure  # noqa: E402

ARMS = (("standard", "Standard AT"), ("namid_a5_clip0.1", "NAMID α=5\nρ=0.1"), ("namid_a5_clip0.5", "NAMID α=5\nρ=0.5"))
NETWORKS = (("smallcnn", "SmallCNN"), ("resnet20", "ResNet-20"))
METRICS = (("clean", "clean"), ("pgd40", "PGD-40"))


def main():
    summary = json.loads((HERE / "summary.json").read_text())
    plt = pyplot()
    fig, axes = plt.subplots(len(METRICS), len(NETWORKS), figsize=(9, 6.5), squeeze=False)
    for col, (net, net_name) in enumerate(NETWORKS):
        for row, (key, key_name) in enumerate(METRICS):
            ax = axes[row][col]
            for x, (arm, _) in enumerate(ARMS):
                values = [summary[run]["test"][key] for seed in range(3)
                          if "test" in summary.get(run := f"{net}_{arm}_s{seed}", {})]
                if not values:
                    continue
                ax.scatter([x] * len(values), values, color=f"C{x}", zorder=3)
                mean = sum(values) / len(values)
                ax.hlines(mean, x - 0.25, x + 0.25, color=f"C{x}")
                ax.annotate(f"{mean:.2f} (n={len(values)})", (x + 0.05, mean), fontsize=8,
                            xytext=(4, 4), textcoords="offset points")
            ax.set_xticks(range(len(ARMS)), [name for _, name in ARMS])
            ax.set_xlim(-0.5, len(ARMS) - 0.3)
            ax.set_title(f"{net_name}: {key_name}, all 10,000 test images")
            ax.set_ylabel("accuracy (%)")
            ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Fashion-MNIST, L∞ ε = 0.1: one dot per seed, line = mean")
    fig.tight_layout()
    print(save_figure(fig, HERE / "summary.png"))


if __name__ == "__main__":
    main()
