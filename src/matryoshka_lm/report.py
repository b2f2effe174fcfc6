"""The report kit every README, model card and benchmark writes with: `md_table` for Markdown tables and `figure`
(plots.py) for PNGs, so that a table looks the same wherever it is written."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from .plots import figure

__all__ = ["figure", "md_table"]

_RULE = {"l": "---", "r": "---:", "c": ":---:", "C": ":-:"}


def md_table(head: Sequence[Any], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A Markdown table: the header row, the rule, one line per row (cells as str(), '|' inside a cell is the
    caller's to escape). `align`, one letter per column: l left, r right, c centred (':---:'), C centred (':-:');
    default: the first column left, the others right, as numbers are."""
    head = [str(h) for h in head]
    align = align or "l" + "r" * (len(head) - 1)
    if len(align) != len(head):
        raise ValueError(f"align {align!r} has {len(align)} letters for {len(head)} columns")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(_RULE[a] for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
