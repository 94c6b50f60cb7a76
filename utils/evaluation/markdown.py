"""One Markdown-table writer for every table the project prints or writes (results, ε sweeps, report.md)."""
from typing import Sequence

# One letter per column: l (Markdown's default, left), r (right), c (centred).
_RULES = {"l": "---", "r": "---:", "c": ":---:"}


def cell(text) -> str:
    """``text`` as one table cell: a '|' inside it would end the cell, so it is escaped."""
    return str(text).replace("|", "\\|")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    """``header``, the alignment row and one line per row, without a final newline.

    ``align`` holds one letter per column (l, r or c); empty means every column left-aligned.
    Every row must have as many cells as ``header``; each cell is escaped by :func:`cell`."""
    align = align or "l" * len(header)
    if len(align) != len(header) or set(align) - set(_RULES):
        raise ValueError(f"align {align!r}: expected one of l, r, c for each of the {len(header)} columns")
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a row of {len(row)} cells in a table of {len(header)} columns: {list(row)!r}")

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell(c) for c in cells) + " |"

    return "\n".join([line(header), "|" + "|".join(_RULES[a] for a in align) + "|", *map(line, rows)])
