"""The consoles every command prints through: data (paths, ids, keys) is never cut in two.

rich wraps text to the console's width and folds a word longer than that width, so a path in
`lmforge data show | cat` came out as `…/datasets/fox/t` + newline + `oken_lengths.png`
(`COLUMNS`, or 80 when nothing says otherwise). These consoles keep that from happening:

- **Piped** (the stream is not a terminal): nothing is wrapped. One logical line is one line and
  a table has its natural width, whatever `$COLUMNS` says, so `grep`, `cut`, `awk` and
  copy-paste see whole paths, ids and keys.
- **In a terminal**: prose still wraps at spaces to the terminal's width, but a word (a path,
  an id, a key) is never folded, cut or elided: a word longer than the line stands on a line of
  its own and the terminal wraps it on screen, which copies back as one piece. A table, a tree
  or a panel is laid out at least as wide as its longest word (its columns never narrower than
  their longest word), wider than the terminal if it has to be, like `docker ps` or `ls -l`.

Every `lmforge.cli` module gets its consoles from `stdout_console()` / `stderr_console()`;
`tests/cli/test_cli_output.py` checks that none builds its own.
"""

from __future__ import annotations

import re
from typing import Any

from rich.cells import cell_len
from rich.console import (
    Console,
    ConsoleDimensions,
    ConsoleOptions,
    ConsoleRenderable,
    JustifyMethod,
    OverflowMethod,
    RenderableType,
    RenderHook,
    RenderResult,
)
from rich.control import Control
from rich.measure import Measurement
from rich.rule import Rule
from rich.segment import Segment
from rich.style import Style
from rich.table import Table
from rich.text import Text

# The width of a console that is not a terminal: unbounded in practice (PATH_MAX is 4096).
_UNBOUNDED = 1 << 16
_WORD = re.compile(r"\s*\S+\s*")


def _terminal_width(console: Console) -> int:
    """The width rich would use for CONSOLE: the terminal's, $COLUMNS, or 80."""
    return int(Console.size.fget(console).width)  # type: ignore[attr-defined]


class _Unbroken:
    """RENDERABLE laid out at least as wide as its longest word (a table: each column at least
    as wide as the longest word in it, or its whole longest line if it does not wrap), so no
    cell, node or panel folds, cuts or elides a word."""

    def __init__(self, renderable: RenderableType) -> None:
        self.renderable = renderable

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        wide = options.update_width(_UNBOUNDED)
        if isinstance(self.renderable, Table):
            for column in self.renderable.columns:
                cells = (
                    [column.header, *column.cells]
                    if self.renderable.show_header
                    else [*column.cells]
                )
                sizes = [Measurement.get(console, wide, cell) for cell in cells]
                need = max((m.maximum if column.no_wrap else m.minimum for m in sizes), default=0)
                column.min_width = max(column.min_width or 0, need)
        size = Measurement.get(console, wide, self.renderable)
        width = max(options.max_width, size.minimum)
        if options.max_width >= _UNBOUNDED:  # piped: the natural width, even for expand=True
            width = size.maximum
            if isinstance(self.renderable, Rule) or width >= _UNBOUNDED:  # no natural width
                width = max(size.minimum, _terminal_width(console))
        yield from console.render(self.renderable, options.update_width(width))

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self.renderable)


class _Spaced:
    """TEXT wrapped at spaces only: a word longer than the line (a path, an id, a key) stands
    on a line of its own, whole — rich's own wrapping would fold it (`overflow="fold"`), cut it
    (`"crop"`, `"ellipsis"`) or not wrap at all (`"ignore"`)."""

    def __init__(self, text: Text) -> None:
        self.text = text

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if options.no_wrap:
            yield self.text
            return
        width = options.max_width
        lines: list[Text] = []
        for line in self.text.split(allow_blank=True):
            starts, column = [], 0
            for word in _WORD.finditer(line.plain):  # a word and the spaces after it
                size = cell_len(word.group().rstrip())
                if column and column + size > width:
                    starts.append(word.start())
                    column = 0
                column += cell_len(word.group())
            for piece in line.divide(starts):
                piece.rstrip()
                lines.append(piece)
        yield from Text("\n").join(lines).render(console, end=self.text.end)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self.text)


def _unbroken(renderable: Any, *, terminal: bool) -> Any:
    """Text (in a terminal) wraps at spaces only; anything that lays out children of its own
    (a table, a tree, a panel) is laid out wide enough for its longest word."""
    if isinstance(renderable, Text):
        return _Spaced(renderable) if terminal else renderable
    if isinstance(renderable, str | Segment | Control) or not hasattr(
        renderable, "__rich_console__"
    ):
        return renderable
    return _Unbroken(renderable)


class _UnbrokenHook(RenderHook):
    """Applies `_unbroken` to what `print` renders, after rich has turned strings into Text."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def process_renderables(self, renderables: list[ConsoleRenderable]) -> list[ConsoleRenderable]:
        terminal = self.console.is_terminal
        return [_unbroken(r, terminal=terminal) for r in renderables]


class CliConsole(Console):
    """A rich `Console` that never breaks a word across lines or cuts it at the terminal's edge
    (see the module docstring). `print` takes rich's arguments; only the defaults differ."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.push_render_hook(_UnbrokenHook(self))

    @property
    def size(self) -> ConsoleDimensions:
        size: ConsoleDimensions = Console.size.fget(self)  # type: ignore[attr-defined]
        if self.is_terminal:
            return size
        return ConsoleDimensions(_UNBOUNDED, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]

    def print(
        self,
        *objects: Any,
        sep: str = " ",
        end: str = "\n",
        style: str | Style | None = None,
        justify: JustifyMethod | None = None,
        overflow: OverflowMethod | None = None,
        no_wrap: bool | None = None,
        emoji: bool | None = None,
        markup: bool | None = None,
        highlight: bool | None = None,
        width: int | None = None,
        height: int | None = None,
        crop: bool = False,
        soft_wrap: bool | None = None,
        new_line_start: bool = False,
    ) -> None:
        if soft_wrap is None and not self.is_terminal:
            soft_wrap = True  # piped: no wrapping at all
        super().print(
            *objects,
            sep=sep,
            end=end,
            style=style,
            justify=justify,
            overflow=overflow,
            no_wrap=no_wrap,
            emoji=emoji,
            markup=markup,
            highlight=highlight,
            width=width,
            height=height,
            crop=crop,  # a word longer than the line is not cut at the terminal's edge
            soft_wrap=soft_wrap,
            new_line_start=new_line_start,
        )


def stdout_console() -> CliConsole:
    """The console for a command's output (results, tables, paths)."""
    return CliConsole(highlight=False)


def stderr_console() -> CliConsole:
    """The console for progress, status and notes on stderr."""
    return CliConsole(stderr=True, highlight=False)
