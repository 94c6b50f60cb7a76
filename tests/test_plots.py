"""utils/plots.py: which metrics share a panel, the curves' PNG, and atomic figure writes."""
import math

import pytest
from matplotlib.image import imread

from utils.plots import curve_panels, plot_curves, pyplot, save_figure

# Two epochs of a stage-3 run as train_MIAT.py logs them (the first one a clean warm-up).
NAMID = [
    {"epoch": 1, "lr": 0.1, "train_epsilon": 0.0, "train_acc": 30.0, "train_loss": 1.9, "clean_acc": 50.0,
     "pgd_acc": 20.0, "mean_acc": 35.0, "seconds": 12.0, "best": True, "selected_on": "val"},
    {"epoch": 2, "lr": 0.1, "train_epsilon": 0.03, "cos_adv": 0.3, "l_adv": 1.7, "l_mi": 0.4, "lam_term": 0.04,
     "train_acc": 35.0, "train_loss": 1.8, "w_size": 19.0, "clean_acc": 60.0, "pgd_acc": 40.0, "mean_acc": 50.0,
     "seconds": 90.0, "best": False, "selected_on": "val"},
]
# One epoch of stage 2: its losses and the Fig. 4 values (an empty W gives null).
ESTIMATOR = [{"epoch": 1, "lr": 0.01, "train_loss": 38.0, "train_loss_n": 14.0, "train_loss_a": 24.0,
              "natural_mi_x_wrong": -2.7, "adversarial_mi_xadv_wrong": None, "n_wrong": 0, "best": True}]


def test_stage3_metrics_fill_the_loss_and_accuracy_panels():
    panels = dict(curve_panels(NAMID))
    assert list(panels) == ["loss", "accuracy (%)", "cosine term of L_mi"]
    assert panels["cosine term of L_mi"] == {"cos_adv": ([2], [0.3])}
    assert set(panels["loss"]) == {"train_loss", "l_adv", "l_mi", "lam_term"}
    assert set(panels["accuracy (%)"]) == {"train_acc", "clean_acc", "pgd_acc", "mean_acc"}
    # Epochs pair with their values; a key logged from epoch 2 on starts there.
    assert panels["accuracy (%)"]["pgd_acc"] == ([1, 2], [20.0, 40.0])
    assert panels["loss"]["l_mi"] == ([2], [0.4])


def test_stage2_metrics_fill_the_mi_panel_and_null_leaves_a_gap():
    panels = dict(curve_panels(ESTIMATOR))
    assert list(panels) == ["loss", "mean MI estimate"]
    assert set(panels["loss"]) == {"train_loss", "train_loss_n", "train_loss_a"}
    assert panels["mean MI estimate"] == {"natural_mi_x_wrong": ([1], [-2.7])}


def test_wmim_standard_mi_is_plotted_with_the_mi_values():
    records = [{"epoch": 1, "standard_mi_x": 0.4, "standard_mi_xadv": 0.2, "l_mi": 0.1}]
    panels = dict(curve_panels(records))
    assert set(panels["mean MI estimate"]) == {"standard_mi_x", "standard_mi_xadv"}
    assert set(panels["loss"]) == {"l_mi"}  # a loss, not an MI estimate


def test_non_finite_and_boolean_values_are_not_plotted():
    records = [{"epoch": 1, "train_loss": math.nan, "clean_acc": True}, {"epoch": 2, "train_loss": 1.0}]
    assert curve_panels(records) == [("loss", {"train_loss": ([2], [1.0])})]


@pytest.mark.parametrize("records, panels", [(NAMID, 3), (ESTIMATOR, 2), (NAMID[:1], 2)])
def test_plot_curves_writes_one_panel_per_group(tmp_path, records, panels):
    path = plot_curves(records, tmp_path / "curves.png", title="run")
    image = imread(path)
    # 4.6 inches a panel at 100 dpi: the width counts the panels drawn.
    assert image.shape[1] == 460 * panels and image.shape[0] == 340
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]


def test_save_figure_leaves_the_old_picture_when_drawing_fails(tmp_path):
    plt = pyplot()
    path = tmp_path / "figure.png"
    path.write_bytes(b"old")
    fig = plt.figure()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    fig.savefig = broken
    with pytest.raises(OSError, match="disk full"):
        save_figure(fig, path)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.png"]
    assert not plt.fignum_exists(fig.number)  # closed all the same
