"""Plain-text tables for the console, never wider than ``MAX_WIDTH`` columns.

`table(rows)` pads the cells of ``rows`` (the first row is the header) into columns. When the columns
do not fit, the table is wrapped: the first ``keep`` columns (the row labels) start every block and the
other columns are spread over as many blocks as needed, one blank line apart, so every number keeps
its header above it. A cell wider than the limit on its own is shortened with ``...``.
"""
from __future__ import annotations

import textwrap
from typing import Optional, Sequence

MAX_WIDTH = 100
GAP = "  "


def shorten(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, ending in ``...`` when cut."""
    return text if len(text) <= width else text[: max(width - 3, 0)] + "..."


def table(rows: Sequence[Sequence[str]], *, align: Optional[str] = None, max_width: int = MAX_WIDTH,
          keep: int = 1, rule: bool = True) -> str:
    """The rows as aligned columns: ``align`` one letter per column, ``l`` or ``r`` (default: the
    first ``keep`` left, the rest right); ``rule``: a dashed line under the header."""
    rows = [[str(c) for c in r] for r in rows]
    if not rows:
        return ""
    n = max(len(r) for r in rows)
    rows = [r + [""] * (n - len(r)) for r in rows]
    keep = min(keep, n)
    align = align or ("l" * keep + "r" * (n - keep))
    # row labels may take at most half the width; any cell at most what is left beside them
    label_room = max(max_width // 2 // max(keep, 1) - len(GAP), 8)
    rows = [[shorten(c, label_room) if i < keep else c for i, c in enumerate(r)] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(n)]
    fixed = sum(widths[:keep]) + len(GAP) * keep
    room = max(max_width - fixed, 8)
    rows = [[c if i < keep else shorten(c, room) for i, c in enumerate(r)] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(n)]
    blocks, current, used = [], [], fixed
    for i in range(keep, n):
        if current and used + widths[i] > max_width:
            blocks.append(current)
            current, used = [], fixed
        current.append(i)
        used += widths[i] + len(GAP)
    if current or not blocks:
        blocks.append(current)
    out = []
    for b, block in enumerate(blocks):
        cols = list(range(keep)) + block
        lines = [GAP.join(r[i].ljust(widths[i]) if align[i] == "l" else r[i].rjust(widths[i]) for i in cols).rstrip()
                 for r in rows]
        if rule:
            lines.insert(1, GAP.join("-" * widths[i] for i in cols))
        if b:
            out.append("")
        out += lines
    return "\n".join(out)


def wrap(text: str, *, indent: str = "", max_width: int = MAX_WIDTH) -> list:
    """A long line as lines of at most ``max_width`` columns, the later ones indented by ``indent``
    plus two spaces (long paths are broken too)."""
    return textwrap.wrap(text, width=max_width, initial_indent=indent, subsequent_indent=indent + "  ",
                         break_on_hyphens=False) or [indent]
