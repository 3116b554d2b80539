"""What a cell runs with on a worker that a kernel's cell would not need: refusals.

A worker has no one at its terminal. What would wait for the user to type (``input()``,
``getpass()``, reading ``sys.stdin``, the debugger) is refused in one line saying why,
instead of failing obscurely or reading nothing; put back after the cell.
"""

from __future__ import annotations

import getpass
import io
import pdb
import sys
import warnings
from typing import Any, NoReturn

from IPython.core.error import StdinNotImplementedError

__all__ = ["CellGuards", "refuse_terminal"]

#: What IPython warns after a cell's ``sys.exit()``.
_EXIT_HINT = "To exit: use 'exit', 'quit', or Ctrl-D."


def refuse_terminal(
    what: str, instead: str = "ask for the value in a cell of its own and use the variable"
) -> NoReturn:
    """Refuse what would wait for the user to type on a worker, in one line."""
    raise StdinNotImplementedError(
        f"{what} cannot be answered in a %%task cell (it runs on a worker): {instead}"
    )


def _refuse_getpass(prompt: str = "Password: ", stream: Any = None) -> str:
    refuse_terminal("getpass()")


def _refuse_debugger(*args: Any, **kwargs: Any) -> None:
    refuse_terminal(
        "the debugger (breakpoint(), pdb.set_trace())", "run the cell without %%task to debug it"
    )


class _RefusedStdin(io.TextIOBase):
    """``sys.stdin`` while a cell runs: reading it is refused, as ``input()`` is.

    A worker's own is empty: ``sys.stdin.readline()`` would give ``""`` at once, as if
    the user had typed nothing, and the cell go on with it.
    """

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> str:
        refuse_terminal("sys.stdin.read()")

    def readline(self, size: int | None = -1) -> str:  # type: ignore[override]
        refuse_terminal("sys.stdin.readline()")

    def readlines(self, hint: int | None = -1) -> list[str]:  # type: ignore[override]
        refuse_terminal("sys.stdin.readlines()")

    def __next__(self) -> str:  # type: ignore[override]  # for line in sys.stdin
        refuse_terminal("sys.stdin")


_REFUSED_STDIN = _RefusedStdin()


class CellGuards:
    """What a cell runs with on a worker, put back after it (unless the cell set its own).

    IPython's warning after a cell's ``sys.exit()`` is not shown: the ``SystemExit`` is
    raised again in the kernel, whose IPython shows the warning, once.

    ``getpass()``, reading ``sys.stdin`` and the debugger are refused as ``input()`` is. A
    worker has no one at its terminal: ``getpass()`` would fail reading it (a warning and
    an ``EOFError``), ``sys.stdin.readline()`` give ``""``, and ``breakpoint()`` or
    ``pdb.Pdb().set_trace()`` end the cell silently (pdb reads an empty stdin and quits). A
    kernel likewise replaces ``getpass`` for the cells it runs.

    A class, not generator context managers: entered for every cell, it costs a fifth
    of what they did (about 2 µs against 9).
    """

    def __enter__(self) -> None:
        shown = warnings.showwarning

        def show(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
            if not (category is UserWarning and str(message) == _EXIT_HINT):
                shown(message, category, *args, **kwargs)

        self._show = show
        self._before = (shown, getpass.getpass, sys.breakpointhook, pdb.set_trace, sys.stdin)
        # Pdb's own, unless a cell before set one on the class: inherited from bdb.Bdb.
        self._pdb_trace = pdb.Pdb.__dict__.get("set_trace")
        warnings.showwarning = show
        getpass.getpass = _refuse_getpass
        sys.breakpointhook = _refuse_debugger
        pdb.set_trace = _refuse_debugger
        pdb.Pdb.set_trace = _refuse_debugger  # type: ignore[method-assign]
        sys.stdin = _REFUSED_STDIN

    def __exit__(self, *_exc: object) -> None:
        shown, own_getpass, own_hook, own_trace, own_stdin = self._before
        if warnings.showwarning is self._show:
            warnings.showwarning = shown
        if getpass.getpass is _refuse_getpass:
            getpass.getpass = own_getpass
        if sys.breakpointhook is _refuse_debugger:
            sys.breakpointhook = own_hook
        if pdb.set_trace is _refuse_debugger:
            pdb.set_trace = own_trace
        if pdb.Pdb.__dict__.get("set_trace") is _refuse_debugger:
            if self._pdb_trace is None:
                del pdb.Pdb.set_trace
            else:
                pdb.Pdb.set_trace = self._pdb_trace  # type: ignore[method-assign]
        if sys.stdin is _REFUSED_STDIN:
            sys.stdin = own_stdin
