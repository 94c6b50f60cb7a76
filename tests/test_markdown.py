"""utils/evaluation/markdown.py: the one Markdown-table writer."""
import pytest

from tests.helpers import markdown_tables
from utils.evaluation.markdown import cell, markdown_table


def test_header_alignment_row_and_rows():
    text = markdown_table(["model", "clean", "pgd40"], [["A", "50.00", "25.00"], ["B", "", "1.00"]], "lrr")
    assert text == "| model | clean | pgd40 |\n|---|---:|---:|\n| A | 50.00 | 25.00 |\n| B |  | 1.00 |"
    assert markdown_tables(text) == [[{"model": "A", "clean": "50.00", "pgd40": "25.00"},
                                      {"model": "B", "clean": "", "pgd40": "1.00"}]]


def test_alignment_letters():
    assert markdown_table(["a", "b", "c"], [], "lrc").splitlines()[1] == "|---|---:|:---:|"
    assert markdown_table(["a", "b"], []).splitlines()[1] == "|---|---|"  # default: every column left
    assert markdown_table(["a", "b"], []) == "| a | b |\n|---|---|"  # no rows, no final newline


def test_a_pipe_inside_a_cell_is_escaped():
    assert cell("a|b") == "a\\|b" and cell(3) == "3"
    text = markdown_table(["model|x", "n"], [["a|b", "`x | y`"]], "lr")
    assert text == "| model\\|x | n |\n|---|---:|\n| a\\|b | `x \\| y` |"
    # Every line keeps its two columns: one unescaped '|' before, between and after the cells.
    for line in text.splitlines():
        assert line.replace("\\|", "").count("|") == 3, line


def test_column_counts_must_agree():
    with pytest.raises(ValueError, match="3 cells in a table of 2 columns"):
        markdown_table(["a", "b"], [["1", "2"], ["1", "2", "3"]])
    with pytest.raises(ValueError, match="align"):
        markdown_table(["a", "b"], [], "l")
    with pytest.raises(ValueError, match="align"):
        markdown_table(["a", "b"], [], "lx")
