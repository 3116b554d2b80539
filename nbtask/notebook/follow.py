"""Following a task: every event of a handle, from those already applied to the last.

A view that starts following a task late (a re-attached handle, a board opened after the
fact) gets the output already received, then the state and progress so far, then each new
event once, so what it shows never depends on when it started.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from nbtask._process import sigint_handled_by
from nbtask.settings import MAX_SECONDS
from nbtask.wire.events import FINAL_STATES, Event, EventType, State

if TYPE_CHECKING:
    from nbtask.core.handle import TaskHandle

__all__ = [
    "POLL_SECONDS",
    "StopPresses",
    "Stopping",
    "cancel_task",
    "cancelled",
    "follow",
    "next_event",
    "one_line",
    "stop_presses",
    "wait_interruptibly",
]

_E = TypeVar("_E", bound=BaseException)


def cancel_task(handle: TaskHandle) -> bool:
    """Revoke a queued task, or interrupt (then kill) a running one."""
    if handle.done():
        return False
    return handle.cancel()


class StopPresses:
    """How many times Stop (``SIGINT``) was pressed while a cell waited on its task."""

    def __init__(self) -> None:
        self.count = 0

    def note(self, _signum: int, _frame: object) -> None:
        """The ``SIGINT`` handler while the cell waits: counted, not raised."""
        self.count += 1


@contextlib.contextmanager
def stop_presses() -> Iterator[StopPresses]:
    """Count the Stop presses (``SIGINT``) until the block ends, instead of raising them.

    A ``KeyboardInterrupt`` raised anywhere in a wait could cut short the cancelling of its
    task: a second Stop a moment after the first left the task running. The wait looks at
    the count between its steps, and cancels whatever number of Stops came. Signals reach
    only the main thread; elsewhere (and under a handler set outside Python) nothing is
    counted, and nothing is raised either.
    """
    presses = StopPresses()
    with sigint_handled_by(presses.note):
        yield presses


#: How long a cell waits for the task a second Stop killed to be reported ended.
_KILLED_SECONDS = 10.0


class Stopping:
    """What the Stops pressed while a ``--wait`` cell waits do to its task, as in a kernel.

    The first interrupts it: a ``KeyboardInterrupt`` in its code, which may handle it and
    go on, and whose ``finally`` blocks run however long they take (the cell follows it
    to its end meanwhile). The second kills it, saying so; the cell then waits for it to
    be reported ended :data:`_KILLED_SECONDS` at most, and a third Stop ends that wait.
    """

    def __init__(self, handle: TaskHandle, label: str, presses: StopPresses) -> None:
        self.handle = handle
        self.label = label
        self.presses = presses
        self.seen = 0  # the Stops acted on
        self._killed_at: float | None = None
        self._gave_up = False

    @property
    def interrupted(self) -> bool:
        """Whether Stop was pressed (and the task interrupted)."""
        return self.seen > 0

    @property
    def killed(self) -> bool:
        """Whether a second Stop killed the task."""
        return self._killed_at is not None

    def act(self) -> bool:
        """Act on the Stops pressed since the last call; whether to stop waiting for the task.

        Called between the steps of the wait, never from the signal handler: a Stop
        pressed while the task's interrupt is sent is acted on next.
        """
        while self.seen < self.presses.count:
            self.seen += 1
            if self.seen == 1:
                interrupt_task(self.handle)
            elif self.seen == 2:
                print(
                    f"nbtask: Stop pressed again: killing task {self.label!r} "
                    f"[{self.handle.id[:8]}]",
                    file=sys.stderr,
                    flush=True,
                )
                kill_task(self.handle)
                self._killed_at = time.monotonic()
            else:
                self._gave_up = True
        killed_at = self._killed_at
        if killed_at is not None and time.monotonic() - killed_at > _KILLED_SECONDS:
            self._gave_up = True
        return self._gave_up

    def error(self) -> KeyboardInterrupt:
        """The cell's error: its task was cancelled (and killed, after a second Stop)."""
        return cancelled(self.label, " (killed at the second Stop)" if self.killed else "")


def interrupt_task(handle: TaskHandle) -> bool:
    """Interrupt a running task (revoke a queued one) and leave it all the time it takes.

    A ``KeyboardInterrupt`` in its code, as Stop raises in a local cell: it is never killed
    for running on (:func:`kill_task` does that).
    """
    if handle.done():
        return False
    return handle.send_revoke(terminate=True, grace=MAX_SECONDS, signal="SIGINT")


def kill_task(handle: TaskHandle) -> bool:
    """Kill a running task's worker process at once (revoke a queued task)."""
    if handle.done():
        return False
    return handle.send_revoke(terminate=True, grace=0.0, signal="SIGKILL")


def one_line(error: _E) -> _E:
    """``error`` as IPython shows it: one line, without nbtask's frames.

    As Python says it: ``Type: message``, or the type alone when there is no message.
    """
    message = str(error)
    line = f"{type(error).__name__}: {message}" if message else type(error).__name__
    error._render_traceback_ = lambda: [line]  # type: ignore[attr-defined]
    return error


def cancelled(label: str, how: str = "") -> KeyboardInterrupt:
    """The error of a cell interrupted while it waited for a task: it says that was cancelled.

    ``how``: said after it (`` (killed ...)``).
    """
    return one_line(KeyboardInterrupt(f"task {label!r} cancelled{how}"))


def follow(handle: TaskHandle, callback: Callable[[Event], None]) -> None:
    """Call ``callback`` with every event of ``handle``: those already applied, then new ones.

    Output events applied before this call are replayed first; an event is never passed
    twice. They are told apart as objects, not by sequence number: the outputs a worker
    sent packed in one event share its number. A replayed event stays in the handle's
    outputs, so no other event takes its ``id`` meanwhile.
    """
    seen: set[int] = set()  # ids of the output events replayed
    lock = threading.Lock()
    backlog: list[Event] = []
    replaying = True

    def on_event(event: Event) -> None:
        with lock:
            if replaying:
                backlog.append(event)
                return
            if id(event) in seen:
                return
        callback(event)

    handle.on_event(on_event)
    for event in handle.outputs:
        seen.add(id(event))
        callback(event)
    with lock:
        replaying = False
        pending, backlog[:] = list(backlog), []
    if not handle.done():
        # State and progress that arrived before we followed are not in ``outputs``.
        for event in _catch_up(handle):
            callback(event)
    for event in pending:
        if id(event) not in seen:
            callback(event)
    if handle.done() and not any(e.state in FINAL_STATES for e in pending):
        callback(_final_event(handle))


def _catch_up(handle: TaskHandle) -> list[Event]:
    """Synthetic events (seq 0) for a running handle's state and progress so far."""
    events = []
    if handle.state in (State.STARTED, State.RETRY):
        kind = EventType.STARTED if handle.state is State.STARTED else EventType.RETRY
        began = handle.started_at or time.time()
        events.append(Event(kind, handle.id, 0, handle.info, began))
    progress = handle.progress
    if progress is not None:
        data = {"done": progress.done, "total": progress.total, "message": progress.message}
        events.append(Event(EventType.PROGRESS, handle.id, 0, data))
    return events


def _final_event(handle: TaskHandle) -> Event:
    """A synthetic final event for a handle that was already done when followed.

    It says when the task ran, as its own events did: a view shows how long it took.
    """
    state = handle.state
    info = handle.info
    kinds = {
        "SUCCESS": EventType.SUCCESS,
        "REVOKED": EventType.REVOKED,
        "WORKER_LOST": EventType.WORKER_LOST,
    }
    kind = kinds.get(str(state), EventType.FAILURE)
    data: dict[str, Any] = dict(info)
    if kind is EventType.FAILURE:
        exc = handle.error
        data.update(
            ename=getattr(exc, "ename", type(exc).__name__),
            evalue=getattr(exc, "evalue", str(exc)),
            # A rebuilt exception of the task's own type keeps it as remote_traceback.
            traceback=getattr(exc, "traceback", None) or getattr(exc, "remote_traceback", ""),
            # The task's own type holds the worker's RemoteError as its cause.
            shown_traceback=getattr(exc, "shown_traceback", None)
            or getattr(getattr(exc, "__cause__", None), "shown_traceback", []),
        )
    if handle.started_at is not None:
        data["started_at"] = handle.started_at
    return Event(kind, handle.id, 1 << 31, data, handle.finished_at or time.time())


def next_event(handle: TaskHandle, events: queue.SimpleQueue[Event], seconds: float) -> Event:
    """The next event :func:`follow` put in ``events``, within ``seconds`` (else ``queue.Empty``).

    This thread reads the client's events itself while it waits, where it can: they then
    reach it without a hop through the listener thread, nor that thread's pause before it
    reads for a task nobody waits on.
    """
    with contextlib.suppress(queue.Empty):
        return events.get_nowait()
    deadline = time.monotonic() + seconds
    if handle.app is not None:
        handle.app.wait_for(handle, seconds, until=lambda: not events.empty())
    return events.get(timeout=max(0.0, deadline - time.monotonic()))


#: How often a wait that Stop may end looks at its task.
POLL_SECONDS = 0.02


def wait_interruptibly(handle: TaskHandle, timeout: float | None = None) -> None:
    """Wait for ``handle``; Stop (however often pressed) cancels the task, then raises.

    Raises
    ------
    KeyboardInterrupt
        Stop was pressed: the task's revoke was sent first.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    with stop_presses() as presses:
        while not handle.done():
            if presses.count:
                cancel_task(handle)
                raise KeyboardInterrupt
            if deadline is not None and time.monotonic() > deadline:
                cancel_task(handle)
                raise TimeoutError(f"task {handle.id} did not finish within {timeout} s")
            # A sleep, not a wait on the handle's lock: it ends soon after a Stop is counted.
            time.sleep(POLL_SECONDS)
