"""Result tables: rows of named values written as CSV, or rendered as markdown or plain text.

Every per-organ table of the package goes through here: `evaluate --checkpoint`'s table and
CSV, the end-of-training Dice table, and `experiment`'s ``results.md``, ``results.csv`` and
``test_scores.csv``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from scse_jax import files


def format_value(value: float) -> str:
    """Three decimals; ``inf`` and ``nan`` as Python writes them."""
    value = float(value)
    return f"{value:.3f}" if math.isfinite(value) else str(value)


def render(header: Sequence[str], rows: Iterable[Sequence[str]], *, markdown: bool = True) -> str:
    """A table of text cells: markdown, or plain text with the first column left-aligned and
    the others right-aligned, each as wide as its widest cell. Ends with a newline."""
    header, rows = [str(cell) for cell in header], [[str(cell) for cell in row] for row in rows]
    if markdown:
        lines = [header, ["---"] * len(header), *rows]
        return "".join("| " + " | ".join(cells) + " |\n" for cells in lines)
    widths = [max(len(cells[i]) for cells in [header, *rows]) for i in range(len(header))]
    return "".join(
        "  ".join([cells[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]) + "\n"
        for cells in [header, *rows]
    )


def write_csv(rows: Sequence[Mapping], path: Path | str, fields: Sequence[str] | None = None) -> None:
    """Writes rows as CSV atomically (all of it or nothing; `files.atomic_write`).

    Args:
      fields: the columns, in order; keys of a row that are not among them are left out, and
        a row without one leaves its cell empty. Default: every key of the rows, in the order
        first met.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fields is None:
        fields = list(dict.fromkeys(key for row in rows for key in row))
    with files.atomic_write(path, newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def organ_rows(rows: Iterable[Mapping], organ: str) -> list[Mapping]:
    """The rows of one organ."""
    return [row for row in rows if row["organ"] == organ]
