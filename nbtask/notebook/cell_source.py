"""A ``%%task`` cell's source in the kernel, under the name the worker compiles it with.

The worker runs the cell as ``Cell In[N]`` (the kernel's count), its lines shifted below
the ``%%task`` line. A function or class the cell defines comes back with that file
name, whose lines only the kernel has: kept here as IPython keeps a cell's, so
``inspect.getsource`` finds them and a traceback through such a function, raised in the
notebook, shows its lines. A cell that does not parse raises the ``SyntaxError`` a cell
of the notebook's own would, at that name and line, shown as IPython shows one.
"""

from __future__ import annotations

import linecache
import re
from collections.abc import Callable
from typing import Any

__all__ = ["CellSyntaxCheck", "cell_filename", "cell_syntax_error", "keep_cell_source"]

_TASK_LINE = re.compile(r"%%task(\s|$)")


def cell_filename(shell: Any) -> str:
    """The name the worker compiles the running cell with: as IPython names it."""
    return f"Cell In[{shell.execution_count}]"


def keep_cell_source(shell: Any, filename: str, python: str, line_offset: int) -> None:
    """Keep ``python`` (the cell as Python) as ``filename``'s lines, below ``line_offset``.

    Its cell number goes into IPython's map of cell files, so a traceback names the frame
    as it names the notebook's own cells (``Cell In[4], line 3``).
    """
    lines = ["\n"] * line_offset + [line + "\n" for line in python.splitlines()]
    # No modification time: linecache.checkcache keeps it, as it keeps IPython's cells.
    linecache.cache[filename] = (len(python), None, lines, filename)
    numbers = getattr(getattr(shell, "compile", None), "_filename_map", None)
    if isinstance(numbers, dict):
        numbers[filename] = shell.execution_count


def cell_syntax_error(
    error: SyntaxError,
    python: str,
    line_offset: int,
    filename: str,
    parse: Callable[[str, str], Any] | None = None,
) -> SyntaxError:
    """The ``SyntaxError`` the notebook raises for the cell ``python`` that raised ``error``.

    ``parse`` is the notebook's own (``shell.compile.ast_parse``): its error is the one a
    cell of the notebook shows (``incomplete input`` where :func:`ast.parse` says ``'('
    was never closed``); without it, ``error`` is said, moved to the cell's name and lines.
    """
    if parse is not None:
        try:
            parse("\n" * line_offset + python, filename)
        except SyntaxError as local:
            return local.with_traceback(None)
    lineno = error.lineno + line_offset if error.lineno else None
    end = error.end_lineno + line_offset if error.end_lineno else None
    where = (filename, lineno, error.offset, error.text, end, error.end_offset)
    return SyntaxError(error.msg, where)


class CellSyntaxCheck:
    """IPython line transform: a ``%%task`` cell that does not parse fails before it runs.

    Raised while IPython transforms the cell, its ``SyntaxError`` is shown as a cell's of
    the notebook (its line and a caret), not below the frames of the magic, which would
    raise it later. A statement that parses but does not compile (``return`` outside a
    function) fails on the worker once those before it ran, as in a kernel.

    ``transform``: IPython's transform of the cell's body (remembered for the magic).
    """

    #: Not run when a console asks whether what is typed so far is a whole cell.
    has_side_effects = True

    def __init__(self, shell: Any, transform: Callable[[Any, str], str]) -> None:
        self._shell, self._transform = shell, transform

    def __call__(self, lines: list[str]) -> list[str]:
        """The cell's ``lines`` unchanged; its ``SyntaxError`` if it is a ``%%task`` cell's."""
        if lines and _TASK_LINE.match(lines[0]):
            python = self._transform(self._shell, "".join(lines[1:]))
            filename = cell_filename(self._shell)
            try:
                self._shell.compile.ast_parse("\n" + python, filename)
            except SyntaxError as exc:
                keep_cell_source(self._shell, filename, python, line_offset=1)
                raise exc.with_traceback(None) from None
        return lines
