"""Plain-text layout for the CLI: every line fits the console's width and no value is cut.

rich's tables share the terminal's width out among their columns and cut what does not fit with
an ellipsis (an error of ``1.33e-06`` becomes ``1.33e…`` at 80 columns). The helpers here lay
the text out themselves for ``console.width``: a table whose rows do not fit wraps the columns
marked ``wrap`` (names, reasons) and, if that is not enough, puts each row's first cell on a line
of its own; prose wraps at word boundaries with a hanging indent. Numbers are never wrapped or
cut. rich only prints the lines (colours on a terminal, none in a pipe), with its own wrapping
off.

The width is the terminal's (any of stdin/stdout/stderr), ``$COLUMNS`` if set, else 80: output
piped into a log is laid out for 80 columns, and ``COLUMNS=120 bnfold ... | tee log`` for 120.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

GAP = 2  # spaces between columns
INDENT = 2  # tables and continuation lines are indented this much
MIN_WRAP = 12  # a wrapped column keeps at least this many characters per line

Cell = str | tuple[str, str]  # text, or (text, rich style)


def console(stderr: bool = False) -> Console:
    """A rich console that never wraps or crops by itself: the helpers below have laid lines out."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def emit(out: Console, lines: Iterable[Text | str]) -> None:
    for line in lines:
        out.print(line)


def wrap(text: str, width: int, *, indent: int = 0, hang: int = INDENT, style: str = "") -> list[Text]:
    """``text`` wrapped at word boundaries to ``width``; continuation lines indented by ``hang`` more.

    A word longer than a line (a long path) is broken, so no line is ever wider than ``width``.
    """
    from rich.text import Text

    first, rest = " " * indent, " " * (indent + hang)
    lines = textwrap.wrap(" ".join(text.split()), max(width, len(rest) + MIN_WRAP), initial_indent=first,
                          subsequent_indent=rest, break_long_words=True, break_on_hyphens=False)
    return [Text(line, style=style) for line in lines or [first]]


@dataclass(frozen=True)
class Column:
    header: str
    right: bool = False  # right-aligned (numbers)
    wrap: bool = False  # may be wrapped over several lines to fit the width (names, reasons)


class Table:
    """Aligned columns under a header line; see the module docstring for what happens when too wide."""

    def __init__(self, *columns: Column, indent: int = INDENT) -> None:
        self.columns = columns
        self.indent = indent
        self.rows: list[list[tuple[str, str]]] = []

    def add_row(self, *cells: Cell) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"a row needs {len(self.columns)} cells, got {len(cells)}")
        self.rows.append([(c, "") if isinstance(c, str) else c for c in cells])

    def render(self, width: int) -> list[Text]:
        widths = [max([len(col.header), *(len(row[i][0]) for row in self.rows)])
                  for i, col in enumerate(self.columns)]
        excess = self.indent + sum(widths) + GAP * (len(widths) - 1) - width
        if excess > 0:
            shrunk = self._shrink(widths, excess)
            if shrunk is None:
                return self._stacked(width)
            widths = shrunk
        lines = [self._line([(c.header, "bold") for c in self.columns], widths, multi=False)[0]]
        for row in self.rows:
            lines += self._line(row, widths, multi=True)
        return lines

    def _shrink(self, widths: list[int], excess: int) -> list[int] | None:
        """Narrow the ``wrap`` columns, widest first, by ``excess`` in all; None if they cannot give that much."""
        widths = list(widths)
        wrappable = [i for i, col in enumerate(self.columns) if col.wrap]
        while excess > 0:
            candidates = [i for i in wrappable if widths[i] > MIN_WRAP]
            if not candidates:
                return None
            widest = max(candidates, key=lambda i: widths[i])
            widths[widest] -= 1
            excess -= 1
        return widths

    def _line(self, cells: Sequence[tuple[str, str]], widths: list[int], *, multi: bool) -> list[Text]:
        from rich.text import Text

        parts = [textwrap.wrap(text, w, break_long_words=True, break_on_hyphens=False) or [""] if multi else [text]
                 for (text, _), w in zip(cells, widths, strict=True)]
        height = max(len(p) for p in parts)
        out = []
        for k in range(height):
            line = Text(" " * self.indent)
            for i, ((_, style), w, col) in enumerate(zip(cells, widths, self.columns, strict=True)):
                piece = parts[i][k] if k < len(parts[i]) else ""
                line.append(piece.rjust(w) if col.right else piece.ljust(w), style=style)
                if i < len(cells) - 1:
                    line.append(" " * GAP)
            line.rstrip()
            out.append(line)
        return out

    def _stacked(self, width: int) -> list[Text]:
        """Each row as its first cell on a line, then ``header value`` pairs wrapped beneath it."""
        out: list[Text] = []
        for row in self.rows:
            out += wrap(row[0][0], width, indent=self.indent, style=row[0][1])
            rest = ", ".join(f"{col.header} {text}" for col, (text, _) in zip(self.columns[1:], row[1:], strict=True))
            out += wrap(rest, width, indent=self.indent + INDENT)
        return out


def key_values(rows: Sequence[tuple[str, Cell]], width: int, *, indent: int = INDENT) -> list[Text]:
    """``key  value`` lines, keys in one column, values wrapped beside them (or beneath, when narrow)."""
    from rich.text import Text

    key_width = min(max((len(k) for k, _ in rows), default=0), 26)
    value_width = width - indent - key_width - GAP
    out: list[Text] = []
    for key, cell in rows:
        text, style = (cell, "") if isinstance(cell, str) else cell
        if value_width < 2 * MIN_WRAP or len(key) > key_width:
            out += wrap(key, width, indent=indent)
            out += wrap(text, width, indent=indent + INDENT, hang=0, style=style)
            continue
        pieces = textwrap.wrap(" ".join(text.split()), value_width, break_long_words=True,
                               break_on_hyphens=False) or [""]
        for k, piece in enumerate(pieces):
            line = Text(" " * indent + (key if k == 0 else "").ljust(key_width) + " " * GAP)
            line.append(piece, style=style)
            out.append(line)
    return out


def number(value: float | None, digits: int = 3) -> str:
    """A measured error or bound: ``2.47e-06``, ``0.000886`` style; never longer than 10 characters."""
    if value is None:
        return "n/a"
    return f"{value:.{digits}g}"


def percent(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "100%" if value == 1.0 else f"{value:.1%}"
