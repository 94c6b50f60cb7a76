"""utils/evaluation/output.py: the evaluation's Markdown tables and the spelling of budgets."""
from tests.helpers import markdown_tables, model_result
from utils.evaluation.output import format_epsilon, results_table


def test_markdown_table_and_epsilon_format():
    r = model_result([1, 1, 0, 0], pgd40=[1, 0, 0, 0])
    (rows,) = markdown_tables(results_table([r], ["pgd40"]))
    assert rows == [{"model": "m", "clean": "50.00", "pgd40": "25.00", "worst case": "25.00"}]
    assert format_epsilon(8 / 255, "linf") == "8/255"
    assert format_epsilon(0.2, "linf") == "0.2"  # 51/255 too, but the user wrote 0.2
    assert format_epsilon(0.5, "l2") == "0.5"


def test_tables_escape_a_pipe_in_a_model_name():
    r = model_result([1, 1, 0, 0], pgd40=[1, 0, 0, 0])
    r.name = "a|b"
    assert results_table([r], ["pgd40"]).splitlines() == [
        "| model | clean | pgd40 | worst case |", "|---|---:|---:|---:|", "| a\\|b | 50.00 | 25.00 | 25.00 |"]
