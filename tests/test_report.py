"""utils/evaluation/report.py: results.md with the mean over seeds, the ε-sweep and Fig. 4 tables, report.md."""
import json
from pathlib import Path

from utils.evaluation.report import (
    group_name,
    merge_results,
    mi_table_markdown,
    results_markdown,
    sweep_markdown,
    write_report,
)


def test_results_markdown_gives_mean_and_std_over_seeds():
    def model(name, clean, pgd):
        return {"name": name, "n": 10000, "clean": clean, "attacks": {"pgd40": pgd}, "worst_case": pgd}

    merged = merge_results([
        {"settings": {"attacks": {"pgd40": {"epsilon": 0.1}}}, "models": [model("NAMID", 80.0, 50.0)],
         "warnings": []},
        {"settings": {}, "models": [model("NAMID (seed 1)", 82.0, 54.0)], "warnings": ["w"]},
        {"settings": {}, "models": [model("TRADES", 70.0, 40.0)], "warnings": []},
    ])
    text = results_markdown(merged)
    assert "| NAMID | 2 | 81.00 ± 1.41 | 52.00 ± 2.83 | 52.00 ± 2.83 |" in text
    assert "| TRADES | 1 |" not in text and "| TRADES | 10000 | 70.00 | 40.00 | 40.00 |" in text
    assert "- w" in text and "pgd40 at ε = 0.1" in text and "white-box" in text


def _mi_record(epoch, value):
    names = [f"{kind}_mi_{inp}_{s}" for kind in ("natural", "adversarial") for inp in ("x", "xadv")
             for s in ("right", "wrong")]
    return {"epoch": epoch, **{name: value + k / 10 for k, name in enumerate(names)}}


def test_mi_table_comes_from_the_last_complete_epoch_when_the_last_line_is_torn(tmp_path):
    complete = [json.dumps(_mi_record(1, 1.0)), json.dumps(_mi_record(2, 2.0))]
    (tmp_path / "metrics.jsonl").write_text("\n".join(complete) + "\n")
    whole = mi_table_markdown(tmp_path)
    assert whole.splitlines()[:3] == ["| MI | input | right (R) | wrong (W) |", "|---|---|---|---|",
                                      "| natural | x | 2.000 | 2.100 |"]
    assert whole.splitlines()[-1] == "| adversarial | x̃ | 2.600 | 2.700 |"
    torn = json.dumps(_mi_record(3, 3.0))[:40]  # a crash in the middle of epoch 3's line
    (tmp_path / "metrics.jsonl").write_text("\n".join(complete) + "\n" + torn)
    assert mi_table_markdown(tmp_path) == whole


def test_mi_table_without_a_complete_epoch_shows_dashes(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "natural_mi')
    lines = mi_table_markdown(tmp_path).splitlines()
    assert len(lines) == 6 and all(line.endswith("| – | – |") for line in lines[2:])


def test_sweep_markdown_marks_missing_budgets():
    sweep = {"settings": {"n_examples": 16, "test_limit": None},
             "models": [{"name": "A", "eps_sweep": {"pgd5": {"epsilon": [0, 0.1], "accuracy": [90.0, 10.0]}}},
                        {"name": "B", "eps_sweep": {"pgd5": {"epsilon": [0.05], "accuracy": [50.0]}}}]}
    assert sweep_markdown(sweep) == ("| model | attack | ε = 0 | ε = 0.05 | ε = 0.1 |\n"
                                     "|---|---|---:|---:|---:|\n"
                                     "| A | pgd5 | 90.00 | – | 10.00 |\n"
                                     "| B | pgd5 | – | 50.00 | – |\n\n"
                                     "On the first 16 test images.")


def test_group_name_joins_the_seeds_of_a_defense():
    assert group_name("NAMID (seed 2)") == group_name("NAMID") == "NAMID"
    assert group_name("NAMID (i) no adversarial MI") == "NAMID (i) no adversarial MI"


def test_write_report_puts_every_table_in_report_md(tmp_path):
    (tmp_path / "results.md").write_text("| model |\n|---|\n| X |\n")
    (tmp_path / "mi_estimator").mkdir()
    (tmp_path / "mi_estimator" / "mi_table.png").write_bytes(b"png")
    (tmp_path / "mi_estimator" / "metrics.jsonl").write_text(json.dumps(_mi_record(1, 1.0)) + "\n")
    write_report(tmp_path, "demo", ["--seeds", "0,1"], "cifar10", [],
                 [("Standard AT", "`train_standard.py --name 'a|b'`", "ran, 3 s")])
    report = Path(tmp_path / "report.md").read_text()
    assert "Command: `python run_pipeline.py --seeds 0,1`" in report
    assert ("| defense | None | PGD-40 | AA | FWA-40 | TI-DIM |\n|---|---|---|---|---|---|\n"
            "| Standard AT | 83.39 |") in report
    assert "The paper reports no" not in report  # CIFAR-10 is the paper's own setting
    assert "### after Eq. 5 training" in report and "| natural | x | 1.000 | 1.100 |" in report
    assert "## Accuracy against ε" not in report and "## Training curves" not in report  # nothing to show
    # A '|' inside a command is escaped, so the stage table keeps its three columns.
    assert report.endswith("| stage | command | this invocation |\n|---|---|---|\n"
                           "| Standard AT | `train_standard.py --name 'a\\|b'` | ran, 3 s |\n")
