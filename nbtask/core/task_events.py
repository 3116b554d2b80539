"""What a task's events made of it, as its client follows it: state, output, outcome.

:class:`TaskEvents` is the :class:`concurrent.futures.Future` part of a
:class:`~nbtask.TaskHandle`: the events of the task applied in order (by the client's
listener), its ``running()`` and ``cancelled()`` as the ``Future`` contract says, and the
callbacks of :meth:`TaskEvents.on_event`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable
from typing import Any

from nbtask.core.fingerprint import warn_code_differs
from nbtask.core.outcome import final_outcome
from nbtask.wire.events import (
    CODE_DIFFERS,
    FINAL_SEQ,
    FINAL_STATES,
    RUN_SEQ_SPAN,
    Event,
    EventType,
    Progress,
    State,
)

__all__ = ["TaskEvents"]

log = logging.getLogger("nbtask.core.handle")
# The states of a Future that is done (concurrent.futures.Future.done's).
_DONE_STATES = frozenset(
    (
        concurrent.futures._base.CANCELLED,
        concurrent.futures._base.CANCELLED_AND_NOTIFIED,
        concurrent.futures._base.FINISHED,
    )
)


class TaskEvents(concurrent.futures.Future[Any]):
    """A task's state, output and outcome, from its events (see :class:`~nbtask.TaskHandle`).

    Parameters
    ----------
    task_id, name
        The task's id and registered name.
    """

    def __init__(self, task_id: str, name: str) -> None:
        super().__init__()
        self.id = task_id
        self.name = name
        self._started_at: float | None = None
        self._finished_at: float | None = None
        self._task_state: State = State.PENDING
        #: When the run of the last STARTED applied began (see ``_skipped_start``).
        self._run_began: float | None = None
        self._progress: Progress | None = None
        self._stdout: list[str] = []
        self._stderr: list[str] = []
        self._outputs: list[Event] = []
        self._last_seq = -1
        self._info: dict[str, Any] = {}
        self._listeners: list[Callable[[Event], None]] = []
        self._custom_state: str | None = None
        #: What the task did before it failed or was stopped, as it reported it (a notebook
        #: cell's names).
        self.partial: Any = None
        self._lock = threading.Lock()

    # State -------------------------------------------------------------------------------------
    def done(self) -> bool:
        """True once the task ended, or its handle was cancelled (:class:`Future`'s).

        Read without the ``Future``'s lock, which orders nothing here (the answer may
        change as soon as it is given either way): asked several times per event read.
        """
        return self._state in _DONE_STATES

    @property
    def state(self) -> State | str:
        """The latest known state (``PENDING`` until the first event).

        A custom state set with ``self.update_state(state=...)`` shows as that string
        until the task's next state.
        """
        return self._custom_state or self._task_state

    @property
    def progress(self) -> Progress | None:
        """The latest progress report, if any."""
        return self._progress

    @property
    def stdout(self) -> str:
        """Everything the task printed so far."""
        return "".join(self._stdout)

    @property
    def stderr(self) -> str:
        """Everything the task wrote to stderr so far."""
        return "".join(self._stderr)

    @property
    def outputs(self) -> list[Event]:
        """Output events in the order the task produced them: stdout, stderr, display."""
        return list(self._outputs)

    @property
    def started_at(self) -> float | None:
        """When the task started running (epoch seconds, its worker's clock), once known."""
        return self._started_at

    @property
    def finished_at(self) -> float | None:
        """When the task ended (epoch seconds, its worker's clock), once it has."""
        return self._finished_at

    def running(self) -> bool:
        """True while a worker runs the task (``STARTED``, or a state it set itself).

        False while it waits: queued (``PENDING``), or between runs (``RETRY``; its next
        run is ``STARTED`` again), and once it ended.
        """
        return self._task_state is State.STARTED and not self.done()

    def cancelled(self) -> bool:
        """True once the task ended ``REVOKED``: cancelled, revoked, or expired unstarted.

        As for any :class:`concurrent.futures.Future`, :meth:`result` and
        :meth:`exception` of a cancelled handle raise a ``CancelledError``: the
        :class:`~nbtask.TaskRevoked` saying why (a subclass of it).
        """
        return self._task_state is State.REVOKED and self.done()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The task's exception, waiting up to ``timeout`` (a ``Future``'s ``exception``).

        Raises
        ------
        TaskRevoked
            The task was revoked (a ``concurrent.futures.CancelledError``, as a cancelled
            ``Future`` raises); :attr:`error` returns it instead.
        TimeoutError
            The task has not ended after ``timeout`` seconds.
        """
        error = super().exception(timeout)
        if self.cancelled() and error is not None:
            raise error
        return error

    @property
    def error(self) -> BaseException | None:
        """The exception the task ended with, without waiting or raising.

        ``None`` while it runs and after a success; for a revoked task, the
        :class:`~nbtask.TaskRevoked` that :meth:`exception` raises.
        """
        return super().exception(0) if self.done() else None

    # Events ---------------------------------------------------------------------------------
    def on_event(self, callback: Callable[[Event], None]) -> None:
        """Call ``callback(event)`` with each event of the task that arrives from now on.

        To miss none, pass the callback when sending: ``task.apply_async(args,
        on_event=callback)`` attaches it before the message goes out.

        Parameters
        ----------
        callback
            Called with one :class:`~nbtask.Event` at a time, in the task's order, after
            the handle applied it (``handle.state``, ``handle.progress`` and, for the final
            event, ``handle.result()`` already show it). ``event.type`` is an
            :class:`~nbtask.EventType`: ``STARTED``, ``PROGRESS`` (``event.progress``),
            ``STDOUT``/``STDERR`` (``event.data["text"]``, what the task wrote since the
            last one: not whole lines), ``DISPLAY``, ``STATE`` (``update_state``),
            ``RETRY``, then one final event: ``SUCCESS``, ``FAILURE``, ``REVOKED`` or
            ``WORKER_LOST``. No event comes twice or out of order, and none comes after the
            final one. Progress reports are coalesced at the worker (a task's events go out
            at most ~100 times a second, with the latest report), so a callback may not see
            every one.
            Each run of a task gives ``STARTED`` before the event that ends it (final, or
            ``RETRY``) even when it ended before the worker sent one (made from that
            event; ``seq`` 0).
            Where events of the task never reached the client (it did not read its
            channel for long, which keeps a bounded number), a ``STDERR`` event (``seq``
            0) says so in one line, in their place; it is in :attr:`stderr` too.

        Notes
        -----
        Callbacks run on the thread reading the client's events, for all the client's
        tasks: its listener thread, or a thread waiting in :meth:`get` (which reads the
        events itself while no other thread does). Keep them short, and never wait on a
        task in one (the reader would be waiting for itself). A revoke of a task that has
        not started is applied at once, on the thread that called ``revoke()``. An
        exception raised by a callback is logged (under the ``nbtask`` logger) and
        ignored: later callbacks, later events and other tasks are not affected.
        Callbacks attached after the final event are never called.
        """
        self._listeners.append(callback)

    # Fed by the listener ----------------------------------------------------------------------
    def apply(self, event: Event, result: Any = None, *, error: Exception | None = None) -> None:
        """Apply one event; events older than the last one applied are ignored.

        A final state is never taken for an old event: whatever its number, it ends the task.
        ``error``: for a final event this client made (a task the broker lost), the
        error the task ends with, in place of the one a worker's event would carry.
        """
        final = event.state in FINAL_STATES
        # Only callbacks can tell the STARTED made from a run's end: the end leaves the
        # handle in the same state with or without it.
        if self._listeners and self._ends_a_run(event, final):
            started = self._skipped_start(event)
            if started is not None:
                self.apply(started)
        with self._lock:
            if self.done() or (not final and event.seq and event.seq <= self._last_seq):
                return
            applied = _lost_note(event, self._unseen(event)) + event.parts()
            self._last_seq = max(self._last_seq, event.seq)
            for part in applied:
                self._apply(part)
        if event.data.get(CODE_DIFFERS):
            warn_code_differs(self.name, event.data.get("worker"), event.data.get("pid"))
        if final:
            try:
                if error is None:
                    self._settle(event, result)
                else:
                    self.set_exception(error)
            except concurrent.futures.InvalidStateError:
                return  # another thread settled it first (e.g. a revoke racing the result)
        for part in applied:
            self._call_back(part)

    def _call_back(self, event: Event) -> None:
        for callback in list(self._listeners):
            try:
                callback(event)
            except Exception:
                log.exception(
                    "an on_event callback of task %s[%s] raised on its %s event",
                    self.name,
                    self.id,
                    event.type.value,
                )

    def _unseen(self, event: Event) -> int:
        """How many events of the run ``event`` is of came before it and never here.

        A run numbers its events one by one from its base (see ``run_seq_base``), its
        ``started`` first; only that ``started`` can be skipped (a task that ended before
        it went out). Counted only once an event of the run came: a handle that follows a
        task from its record alone knows of no output to miss.
        """
        if not 0 < event.seq < FINAL_SEQ:
            return 0
        base = event.seq - event.seq % RUN_SEQ_SPAN
        if self._last_seq <= base:
            return 0
        return max(0, event.seq - self._last_seq - 1)

    def _ends_a_run(self, event: Event, final: bool) -> bool:
        """Whether ``event`` ends a run and is new here: a final event, or a later RETRY."""
        if self.done():
            return False
        if final:
            return True
        return event.state is State.RETRY and event.seq > max(self._last_seq, 0)

    def _skipped_start(self, end: Event) -> Event | None:
        """The STARTED event a worker skipped for a run that ended before it went out.

        The event ending a run (final, or ``RETRY``) of a task that ran carries
        ``started_at``; a run whose STARTED did arrive left the handle ``STARTED`` since
        that time (one ``STARTED`` since an earlier run's is not this run's: that run's
        ``RETRY`` went unread).
        """
        began = end.data.get("started_at")
        if not isinstance(began, (int, float)):
            return None
        if self._task_state is State.STARTED and self._run_began == began:
            return None
        data = {k: end.data[k] for k in ("worker", "pid", "started_at") if k in end.data}
        return Event(EventType.STARTED, self.id, 0, data, float(began), end.run)

    def _apply(self, event: Event) -> None:
        kind, data = event.type, event.data
        if kind is EventType.PROGRESS:
            self._progress = event.progress
        elif kind is EventType.STDOUT:
            self._stdout.append(str(data.get("text", "")))
            self._outputs.append(event)
        elif kind is EventType.STDERR:
            self._stderr.append(str(data.get("text", "")))
            self._outputs.append(event)
        elif kind is EventType.DISPLAY:
            self._outputs.append(event)
        elif kind is EventType.STATE:
            self._custom_state = str(data.get("state", "")) or None
            self._info["meta"] = data.get("meta", {})
        if event.state is not None:
            self._task_state = event.state
            self._custom_state = None
        if kind is EventType.STARTED:
            began = data.get("started_at")
            self._run_began = began if isinstance(began, (int, float)) else event.timestamp
        self._note_times(event)
        self._info.update(
            {k: v for k, v in data.items() if k in ("worker", "pid", "reason", "retries", "eta")}
        )

    def _note_times(self, event: Event) -> None:
        """When the run began (every event of a run says it) and when the task ended."""
        began = event.data.get("started_at")
        if self._started_at is None:
            if isinstance(began, (int, float)) and not isinstance(began, bool):
                self._started_at = float(began)
            elif event.type is EventType.STARTED:
                self._started_at = event.timestamp
        if event.state in FINAL_STATES:
            self._finished_at = event.timestamp

    def _settle(self, event: Event, result: Any) -> None:
        outcome = final_outcome(event, result, self.id, f"{self.name}[{self.id}]")
        if outcome.partial is not None:  # set before done callbacks run
            (self.partial,) = outcome.partial
        if outcome.error is None:
            self.set_result(outcome.value)
        else:
            self.set_exception(outcome.error)


def _lost_note(event: Event, unseen: int) -> list[Event]:
    """The line on stderr saying that ``unseen`` events before ``event`` never came (if any).

    Its output among them is lost (a client that did not read its channel for long, or a
    worker that could not send): the task's output says so where it is missing.
    """
    if not unseen:
        return []
    text = (
        f"[nbtask: output lost here: {unseen} event(s) of this task never reached this "
        "client (it did not read them in time, or its worker could not send them)]\n"
    )
    return [Event(EventType.STDERR, event.task_id, 0, {"text": text}, event.timestamp, event.run)]
