"""Tables and lines that fit the terminal without cutting what they show.

A :class:`Grid` is a table whose columns say where their cells may break (:class:`Wrap`).
:func:`show` prints it as a table at its natural width when the terminal is wide enough;
narrower, the cells break where their column lets them (between words, after the comma
of a list, at an arrow), down to the widest unbreakable piece of each column; narrower
still, each row becomes a block of its own: the row's name on a line, then its fields as
``header: value`` pairs, as many to a line as fit. An identifier or a number (with its
unit: ``1.20 G``) is never cut, folded or elided. :func:`flow` prints a line of fields
that breaks only between them.

:class:`TrailingSpaceFree` is the stream the command line prints through: the padding
Rich puts at the end of table lines never reaches a pipe.
"""

from __future__ import annotations

import enum
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, TextIO

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

Justify = Literal["left", "right"]

_INDENT = 2  # of the fields under a stacked row's name
_GAP = "   "  # between the fields on one line of a stacked row
_UNIT = r"(?:[kMGT]|B|KiB|MiB|GiB)\b"  # what follows a number: 1.20 G, 3.1 MiB


class Wrap(enum.Enum):
    """Where a column's cells may break across lines (at a space, which the break drops)."""

    NEVER = "never"  # an identifier, a number, a shape: one line, whole
    WORDS = "words"  # prose: between words, never between a number and its unit
    ITEMS = "items"  # a list 'a, b, c': after a comma, never inside an item
    ARROWS = "arrows"  # 'old -> new (x2.0)': beside the arrow or before the parenthesis


_BREAKS = {
    Wrap.WORDS: re.compile(rf" (?!{_UNIT})"),
    Wrap.ITEMS: re.compile(r"(?<=,) "),
    Wrap.ARROWS: re.compile(r" (?=-> )|(?<= ->) | (?=\()"),
}


@dataclass(frozen=True)
class Column:
    """One column: its header, alignment, footer and where its cells may break."""

    header: str
    justify: Justify = "left"
    footer: str | Text = ""
    wrap: Wrap = Wrap.NEVER


@dataclass
class Grid:
    """A table to :func:`show`: a plain-text title, columns, and rows of cells (Rich
    markup strings or Text).

    ``key`` is the column that names a row: a stacked row's heading. Columns without a
    header (a mark such as the winner's ``*``) lead that heading."""

    columns: Sequence[Column]
    title: str | None = None
    key: int = 0
    rows: list[list[Text]] = field(default_factory=list)

    def add_row(self, *cells: str | Text) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"a row of {len(cells)} cells in a grid of {len(self.columns)}")
        self.rows.append([_text(c) for c in cells])

    @property
    def footed(self) -> bool:
        return any(_text(c.footer).plain for c in self.columns)


def _text(cell: str | Text) -> Text:
    return cell if isinstance(cell, Text) else Text.from_markup(cell)


def show(grid: Grid, console: Console) -> None:
    """Print ``grid`` whole at the console's width: a table, its cells broken if need
    be, or one block per row when even the broken table is too wide."""
    if grid.title:
        console.print(Text(grid.title), soft_wrap=True)
    natural = [_width(grid, i, whole=True) for i in range(len(grid.columns))]
    room = console.width - _overhead(grid, natural, console)
    if sum(natural) <= room:
        console.print(_table(grid))
        return
    least = [_width(grid, i, whole=False) for i in range(len(grid.columns))]
    if sum(least) <= room:
        console.print(_table(grid, _share(natural, least, room)))
        return
    _stacked(grid, console)


def flow(console: Console, fields: Sequence[str | Text], gap: str = "  ") -> None:
    """One line of ``fields`` joined by ``gap``, broken only between fields; a field wider
    than the console has its own line(s), broken between its words."""
    lines: list[Text] = []
    for item in map(_text, fields):
        last = lines[-1] if lines else None
        if last is not None and cell_len(last.plain + gap + item.plain) <= console.width:
            last.append(gap)
            last.append_text(item)
        else:
            lines.append(item.copy())
    for line in lines:
        console.print(_broken(line, console.width, Wrap.WORDS), soft_wrap=True)


def _cells(grid: Grid, index: int) -> list[Text]:
    """Every cell of a column, its footer included (the header is measured apart)."""
    column = grid.columns[index]
    cells = [row[index] for row in grid.rows]
    return [*cells, _text(column.footer)] if grid.footed else cells


def _pieces(plain: str, wrap: Wrap) -> list[tuple[int, int]]:
    """The (start, end) of the pieces of ``plain`` that a break never enters; the text
    between two pieces is the space a break there drops."""
    spans = [(0, len(plain))]
    if wrap is not Wrap.NEVER:
        cuts = [m.start() for m in _BREAKS[wrap].finditer(plain)]
        starts, ends = [0, *(c + 1 for c in cuts)], [*cuts, len(plain)]
        spans = list(zip(starts, ends, strict=True))
    return spans


def _width(grid: Grid, index: int, whole: bool) -> int:
    """A column's content width: its widest line, or (``whole`` false) its widest piece."""
    column = grid.columns[index]
    texts = [Text(column.header), *_cells(grid, index)]
    widths = []
    for n, text in enumerate(texts):
        wrap = Wrap.NEVER if whole else Wrap.WORDS if n == 0 else column.wrap
        for line in text.plain.splitlines() or [""]:
            widths += [cell_len(line[a:b]) for a, b in _pieces(line, wrap)]
    return max(widths, default=0)


def _overhead(grid: Grid, natural: list[int], console: Console) -> int:
    """The width a table adds to its columns' content: padding and rules."""
    wide = console.options.update_width(10 * sum(natural) + 1000)
    return Measurement.get(console, wide, _table(grid)).maximum - sum(natural)


def _share(natural: list[int], least: list[int], room: int) -> list[int]:
    """Column widths between ``least`` and ``natural`` that add up to at most ``room``,
    the spare room shared in proportion to what each column lacks."""
    lack = [n - m for n, m in zip(natural, least, strict=True)]
    spare = room - sum(least)
    widths = [m + spare * k // sum(lack) for m, k in zip(least, lack, strict=True)]
    for i, (w, n) in enumerate(zip(widths, natural, strict=True)):  # what rounding left over
        widths[i] += max(min(n - w, room - sum(widths)), 0)
    return widths


def _table(grid: Grid, widths: list[int] | None = None) -> Table:
    """The Rich table of ``grid``: at its natural width, or at ``widths`` with every cell
    (and header) broken beforehand into lines of at most its column's width."""

    def fitted(cell: Text, i: int, wrap: Wrap) -> Text:
        return cell if widths is None else _broken(cell, widths[i], wrap)

    table = Table(show_footer=grid.footed, header_style="bold", box=box.SIMPLE_HEAD)
    for i, c in enumerate(grid.columns):
        table.add_column(
            fitted(Text(c.header), i, Wrap.WORDS),
            justify=c.justify,
            footer=fitted(_text(c.footer), i, c.wrap),
            width=None if widths is None else widths[i],
            no_wrap=True,
            overflow="fold",  # never reached: nothing is wider than its column
        )
    for row in grid.rows:
        table.add_row(*(fitted(cell, i, grid.columns[i].wrap) for i, cell in enumerate(row)))
    return table


def _broken(cell: Text, width: int, wrap: Wrap) -> Text:
    """``cell`` broken into lines of at most ``width`` (where it can be) at the places
    ``wrap`` allows, styles kept."""
    plain = cell.plain
    if "\n" in plain or cell_len(plain) <= width:
        return cell
    breaks: list[int] = []
    line = 0
    for start, end in _pieces(plain, wrap):
        if start > line and cell_len(plain[line:end]) > width:
            breaks.append(start)
            line = start
    lines = list(cell.divide(breaks))
    for piece in lines:
        piece.rstrip()
    return Text("\n").join(lines)


def _stacked(grid: Grid, console: Console) -> None:
    """One block per row: its name, then its fields, as many to a line as fit; a blank
    line before each and after the last, where a table has its rules."""
    rows = list(grid.rows)
    if grid.footed:
        rows.append([_text(c.footer) for c in grid.columns])
    room = max(console.width - _INDENT, 1)
    for row in rows:
        console.print()
        marks = [row[i] for i, c in enumerate(grid.columns) if not c.header and row[i].plain]
        heading = Text(" ").join([*marks, row[grid.key]])
        heading.stylize("bold")
        if heading.plain:  # soft wrap: a piece wider than the terminal is left whole
            console.print(
                _broken(heading, console.width, grid.columns[grid.key].wrap), soft_wrap=True
            )
        pairs = [
            _pair(c, row[i], room)
            for i, c in enumerate(grid.columns)
            if i != grid.key and c.header and row[i].plain
        ]
        for line in _lines(pairs, room):
            for part in line.split("\n"):
                console.print(Text(" " * _INDENT) + part, soft_wrap=True)
    console.print()


def _pair(column: Column, value: Text, room: int) -> Text:
    """``header: value``, broken where the column lets it if it is wider than ``room``."""
    pair = Text.assemble((f"{column.header}: ", "dim"), value)
    return _broken(pair, room, column.wrap if column.wrap is not Wrap.NEVER else Wrap.WORDS)


def _lines(pairs: list[Text], room: int) -> list[Text]:
    """The pairs packed into lines of at most ``room`` cells, broken only between pairs
    (a pair broken over lines has those lines to itself)."""
    lines: list[Text] = []
    for pair in pairs:
        last = lines[-1] if lines else None
        alone = last is None or "\n" in last.plain or "\n" in pair.plain
        if not alone and last is not None and cell_len(last.plain + _GAP + pair.plain) <= room:
            last.append(_GAP)
            last.append_text(pair)
        else:
            lines.append(pair.copy())
    return lines


class TrailingSpaceFree(io.TextIOBase):
    """A text stream that writes to ``out`` each line without its trailing spaces.

    Nothing but spaces is ever held back: the spaces at the end of what was written so
    far wait for the rest of their line, and are dropped if it ends there."""

    def __init__(self, out: TextIO) -> None:
        super().__init__()
        self._out = out
        self._spaces = ""

    def write(self, text: str) -> int:
        *whole, last = (self._spaces + text).split("\n")
        for line in whole:
            self._out.write(line.rstrip(" ") + "\n")
        kept = last.rstrip(" ")
        self._out.write(kept)
        self._spaces = last[len(kept) :]
        return len(text)

    def flush(self) -> None:
        self._out.flush()

    def isatty(self) -> bool:
        return self._out.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]  # read-only, as in io.TextIOBase
        return getattr(self._out, "encoding", None) or "utf-8"
