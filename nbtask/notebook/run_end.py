"""The end of a headless run: the background cells still running are waited for.

A notebook run to its end in a frontend leaves its background ``%%task`` cells running
until they end, their views showing how. ``nbtask run`` (:mod:`.headless`) calls
:func:`finish_background` in the kernel after the last cell, so that the run ends as the
notebook would: with every background cell's final output in the executed notebook, and a
failed one failing the run. It runs in the kernel, like any cell.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Any

from nbtask.errors import TaskRevoked
from nbtask.notebook.cell_run import CellRun
from nbtask.notebook.follow import cancel_task, one_line
from nbtask.notebook.magics import session_of

__all__ = ["finish_background"]

_POLL_SECONDS = 0.05
#: How long a cancelled cell, or a finished cell's view, is given to show its end.
_SETTLE_SECONDS = 10.0


def finish_background(shell: Any, timeout: float | None, may_fail: Collection[int] = ()) -> None:
    """Wait up to ``timeout`` seconds for the background cells still running.

    Their names are delivered as a later cell would find them, and each view shows its
    final state before this returns (the display updates leave ahead of the cell's end).
    The cells numbered (``In[N]``) in ``may_fail``, tagged ``raises-exception`` in the
    notebook, may fail as such a cell that waits may: their failure is no error here.

    Raises
    ------
    TimeoutError
        One still ran after ``timeout`` seconds: those still running were cancelled.
    RuntimeError
        A background cell not in ``may_fail`` failed, and no later cell raised its error
        already (by reading one of its names). One that was cancelled is not a failure.
    """
    session = session_of(shell)
    if session is None:  # nbtask was not loaded, or was unloaded
        return
    background = [run for run in session.pending.runs if run.view is not None]
    running = [run for run in background if not run.handle.done()]
    if running:
        print(
            f"nbtask: waiting for {_count(running)} still running in the background: "
            + ", ".join(_named(run) for run in running),
            flush=True,
        )
    deadline = None if timeout is None else time.monotonic() + timeout
    while any(not run.handle.done() for run in running):
        if deadline is not None and time.monotonic() > deadline:
            late = [run for run in running if not run.handle.done()]
            for run in late:
                cancel_task(run.handle)
            _settle(late)
            raise one_line(
                TimeoutError(
                    f"{_count(late)} still ran {timeout:g} s after the last cell, and "
                    f"{'was' if len(late) == 1 else 'were'} cancelled: "
                    f"{', '.join(_named(run) for run in late)} (raise --timeout)"
                )
            )
        time.sleep(_POLL_SECONDS)
    _settle(background)
    session.pending.harvest()
    failed = [run for run in background if _failed(run) and run.cell not in may_fail]
    if failed:
        first, *others = failed
        error = first.handle.error
        more = f" (and {_count(others)} more: {', '.join(map(_named, others))})" if others else ""
        raise one_line(RuntimeError(f"{_named(first)} failed with {_said(error)}{more}"))


def _failed(run: CellRun) -> bool:
    """A run that failed and whose error no cell raised (a cancelled one did not fail)."""
    error = run.handle.error
    return error is not None and not isinstance(error, TaskRevoked) and not run.delivered


def _settle(runs: list[CellRun]) -> None:
    """Wait (a little) until each run (ended, or cancelled a moment ago) shows how it ended."""
    deadline = time.monotonic() + _SETTLE_SECONDS
    for run in runs:
        while run.view is not None and not run.view.shows_end():
            if time.monotonic() > deadline:
                return
            time.sleep(_POLL_SECONDS)


def _count(runs: list[CellRun]) -> str:
    return "1 cell" if len(runs) == 1 else f"{len(runs)} cells"


def _named(run: CellRun) -> str:
    """``cell In[2] ('train')``: how the headless run finds it in the notebook."""
    where = f"cell In[{run.cell}]" if run.cell else "cell"
    return f"{where} ({run.label!r})"


def _said(error: BaseException | None) -> str:
    """``ZeroDivisionError: division by zero``, the error's first line."""
    if error is None:
        return "an error"
    name = str(getattr(error, "ename", "") or type(error).__name__)
    value = str(getattr(error, "evalue", None) or error).strip().splitlines()
    return f"{name}: {value[0]}" if value and value[0] and value[0] != name else name
