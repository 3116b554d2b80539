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

from nbtask._text import printable
from nbtask.client.live_workers import unserved_reason
from nbtask.core.holding import is_holder_queue
from nbtask.errors import TaskRevoked
from nbtask.notebook.cell_run import CellRun
from nbtask.notebook.follow import StopPresses, cancel_task, one_line, stop_presses
from nbtask.notebook.magics import session_of
from nbtask.wire.events import State

__all__ = ["NO_WORKER_GRACE", "finish_background"]

_POLL_SECONDS = 0.05
#: How long a cancelled cell, or a finished cell's view, is given to show its end.
_SETTLE_SECONDS = 10.0
#: Seconds a background cell's task may wait, not started, while nbtask can tell that no
#: live worker can take it, before the run gives up on it: a worker started along with
#: the run has registered by then.
NO_WORKER_GRACE = 10.0
#: How often those tasks' waiting reasons are looked at (the registry is read at most
#: every few seconds anyway).
_REASON_SECONDS = 1.0


def finish_background(shell: Any, timeout: float | None, may_fail: Collection[int] = ()) -> None:
    """Wait up to ``timeout`` seconds for the background cells still queued or running.

    Their names are delivered as a later cell would find them, and each view shows its
    final state before this returns (the display updates leave ahead of the cell's end).
    The cells numbered (``In[N]``) in ``may_fail``, tagged ``raises-exception`` in the
    notebook, may fail as such a cell that waits may: their failure is no error here.

    A cell whose task has not started while nbtask can tell why it waits (no live worker
    consumes its queue, or holds the dataset it requires: see
    :attr:`~nbtask.core.handle.TaskHandle.waiting_reason`) for :data:`NO_WORKER_GRACE`
    seconds (10) in a row is cancelled then, not at the timeout, and fails the run
    with that reason once the others have ended.

    Raises
    ------
    TimeoutError
        One was not done after ``timeout`` seconds: those not done were cancelled.
    RuntimeError
        A cell never started, for want of a worker (above); or a background cell not in
        ``may_fail`` failed, and no later cell raised its error already (by reading one of
        its names). One that was cancelled is not a failure.
    KeyboardInterrupt
        The kernel was interrupted meanwhile: the cells not done were cancelled.
    """
    session = session_of(shell)
    if session is None:  # nbtask was not loaded, or was unloaded
        return
    background = [run for run in session.pending.runs if run.view is not None]
    running = [run for run in background if not run.handle.done()]
    if running:
        print(
            f"nbtask: waiting for {_count(running)} still queued or running in the "
            "background: " + ", ".join(_named(run) for run in running),
            flush=True,
        )
    # Stop (SIGINT) is counted, not raised, so that more of them cannot cut the cancelling
    # short; ``nbtask run`` sends it again until the wait ends.
    with stop_presses() as presses:
        try:
            unserved = _wait(running, timeout, presses)
        except KeyboardInterrupt:
            late = _cancel([run for run in running if not run.handle.done()])
            said = ", ".join(map(_named, late))
            what = f"{_count(late)} not done {'was' if len(late) == 1 else 'were'} cancelled"
            raise one_line(KeyboardInterrupt(f"{what}: {said}" if late else "")) from None
    _settle(background)
    session.pending.harvest()
    failed = [run for run in background if _failed(run) and run.cell not in may_fail]
    if unserved:
        also = f"; and {', '.join(map(_named, failed))} failed" if failed else ""
        raise one_line(RuntimeError("; ".join(unserved) + also))
    if failed:
        first, *others = failed
        error = first.handle.error
        more = f" (and {_count(others)} more: {', '.join(map(_named, others))})" if others else ""
        raise one_line(RuntimeError(f"{_named(first)} failed with {_said(error)}{more}"))


def _wait(running: list[CellRun], timeout: float | None, presses: StopPresses) -> list[str]:
    """Wait until each of ``running`` ended, or was cancelled for want of a worker.

    Returns what is said of each of the latter (``cell In[3] ('x') never started: ...``).
    Raises ``KeyboardInterrupt`` once Stop was pressed (counted in ``presses``).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    unserved: list[str] = []
    stuck_since: dict[int, float] = {}  # id(run) -> since when no worker could take it
    looked = float("-inf")
    while waiting := [run for run in running if not run.handle.done()]:
        if presses.count:
            raise KeyboardInterrupt
        now = time.monotonic()
        if deadline is not None and now > deadline:
            _time_out(waiting, timeout)
        if now - looked >= _REASON_SECONDS:
            looked = now
            for run in waiting:
                reason = _unserved(run)
                since = stuck_since.setdefault(id(run), now) if reason else None
                if since is None:
                    stuck_since.pop(id(run), None)
                elif now - since >= NO_WORKER_GRACE:
                    said = f"{_named(run)} never started: {reason}"
                    print(f"nbtask: {said}; it was cancelled", flush=True)
                    _cancel([run])
                    unserved.append(said)
        time.sleep(_POLL_SECONDS)
    return unserved


def _time_out(late: list[CellRun], timeout: float | None) -> None:
    """Cancel the runs not done at the timeout, and raise the ``TimeoutError`` saying so.

    One that never started and that no worker can take is said to be so: a longer timeout
    would not help it.
    """
    reasons = [_unserved(run) for run in late]
    _cancel(late)
    said = [
        f"{_named(run)} never started: {reason}" if reason else _named(run)
        for run, reason in zip(late, reasons, strict=True)
    ]
    advice = " (raise --timeout)" if not all(reasons) else ""
    raise one_line(
        TimeoutError(
            f"{_count(late)} still ran {timeout:g} s after the last cell, and "
            f"{'was' if len(late) == 1 else 'were'} cancelled: {', '.join(said)}{advice}"
        )
    )


def _unserved(run: CellRun) -> str | None:
    """Why no worker can take ``run``'s task, which has not started; ``None`` if one may."""
    handle = run.handle
    reason = handle.waiting_reason if handle.state is State.PENDING else None
    if not reason:
        return None
    queue = handle.queue or ""
    # Advice only where no worker of the queue is known at all (not one stopped, or for
    # a dataset or a process's own queue, whose reasons say what to do).
    if reason == unserved_reason(queue) and not is_holder_queue(queue):
        reason += f" (start one: nbtask worker -Q {printable(queue)})"
    return reason


def _cancel(runs: list[CellRun]) -> list[CellRun]:
    """Cancel ``runs``, and wait (a little) until each view shows it; returns ``runs``."""
    for run in runs:
        cancel_task(run.handle)
    _settle(runs)
    return runs


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
