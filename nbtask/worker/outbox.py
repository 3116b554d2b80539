"""A task's outbox: sends its output, progress and state reports at once, rate-capped."""

from __future__ import annotations

import io
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from nbtask.brokers import Transport
from nbtask.errors import BrokerUnavailable
from nbtask.wire.envelope import Signer
from nbtask.wire.events import Event, EventType, Run
from nbtask.worker.descriptors import DescriptorOutput
from nbtask.worker.journal import Journal
from nbtask.worker.wakeup import Alarm, Bell, wait_for

__all__ = ["CAP_SECONDS", "PACK_CHARS", "STARTED_AFTER_SECONDS", "Outbox", "TaskStream"]

log = logging.getLogger("nbtask.worker")
_Output = tuple[EventType, dict[str, Any]]  # an output's kind and data
# The rate cap: a task's events go out at most once per this many seconds (on average:
# see Outbox._due). Well below what a person notices, and the widget repaints at most
# ~15 times a second on its own.
CAP_SECONDS = 1 / 100
# A task's ``started`` goes out once the task has run this long: one that ends sooner needs
# none (its final event says when it started), and costs no wake of the outbox's thread.
STARTED_AFTER_SECONDS = 0.0005
#: Outputs of one send go packed in events of about this many characters of text at most
#: (one output larger than that goes alone).
PACK_CHARS = 256 * 1024


class Outbox:
    """Sends a running task's events: each at once, unless the task sent some just before.

    An event after a quiet spell (a progress report, printed text) goes out at once, from
    the outbox's own thread, while the task runs on: the task's thread never waits for the
    broker while the task runs. A task's ``started`` goes out once the task has run for
    :data:`STARTED_AFTER_SECONDS` (or with its first other event, if that comes sooner).
    Events that come sooner than :data:`CAP_SECONDS` after the send before wait for the end
    of the cap and go out together (the trailing edge): text concatenated in order,
    displays and custom states in their place, packed in one ``output`` event however
    often the task switched between them (see :func:`_packed`), progress coalesced. A
    progress report superseded by a later one before it went out is the only thing ever
    dropped. The cap is each task's own: a task's ``started`` never waits on what the task
    before it sent.

    :meth:`end` flushes everything buffered before the task's final event, which is never
    delayed and never overtakes the task's earlier events: sequence numbers rise in the
    order events reach the client. A task that ends before its ``started`` event went
    out, with nothing else to send, skips it (its final or ``retry`` event names the
    worker and when the run started; a client's handle makes the ``started`` from it).

    Output belongs to the task whose code wrote it: a thread a task started and left
    running is remembered as that task's, and what it writes later is dropped (logged once)
    rather than shown as another task's output.

    A process that task code forks from the child gets a copy of the outbox that sends
    nothing: the broker connections it shares with the child are the child's alone, and
    only the child reports. Its printed text goes to the worker's own stream.

    Parameters
    ----------
    transport
        Where events go (the outbox's thread uses a connection of its own).
    signer
        Signs each event.
    clock
        Monotonic seconds; the cap is measured with it (tests pass a clock they move).
    started_after
        How long a task runs before its ``started`` goes out (real time, on a kernel timer).
    """

    def __init__(
        self,
        transport: Transport,
        signer: Signer,
        *,
        clock: Callable[[], float] = time.monotonic,
        started_after: float = STARTED_AFTER_SECONDS,
    ) -> None:
        self._transport = transport
        self._signer = signer
        self._clock = clock
        self._lock = threading.Lock()
        # Wakes the outbox's thread: there is something to send, or a new task.
        self._bell = Bell()
        # Expires when the running task has run long enough to announce it started.
        self._alarm = Alarm(started_after)
        self._timed = self._alarm.available  # (asked twice a task)
        self._started_due = False
        # The cap keeps a schedule of its own: a batch is due when its first report came,
        # or a cap after the batch before was due, whichever is later. A send the thread
        # makes late (a busy machine) therefore never makes the next report wait.
        self._due = -math.inf  # when the batch last taken was due
        self._first_at = -math.inf  # when the first report now buffered came
        self._task_id = ""
        self._run: Run = ("", None)
        self._channel = ""
        self._seq = 0
        self._started: Event | None = None
        # The started that end() left out, for a run that then has no final event.
        self._skipped: Event | None = None
        # Output in the order produced: stdout/stderr text (adjacent chunks merged) and
        # rich displays. Progress is kept apart because only its latest value matters.
        self._output: list[tuple[EventType, dict[str, Any]]] = []
        self._progress: dict[str, Any] | None = None
        self._flush_lock = threading.Lock()
        self._active = False
        self._threads_before: set[int] = set()
        # Threads a task left running -> that task's id; their later output is dropped.
        self._leftovers: dict[int, str] = {}
        self._forked = False
        threading.Thread(target=self._pump, name="nbtask-outbox", daemon=True).start()
        outbox = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _disown(outbox()))

    def own_thread(self, ident: int) -> None:
        """Thread ``ident`` is nbtask's own, started while a task runs: not one it left."""
        with self._lock:
            self._threads_before.add(ident)

    def threads_left_running(self) -> bool:
        """Whether a thread an earlier task left running is alive (as the task began)."""
        with self._lock:
            return bool(self._leftovers)

    def _disown(self) -> None:
        """In a process forked from the child (only the forking thread runs on there)."""
        self._forked = True
        # Another thread may have held these at the fork, and it does not exist here.
        self._lock, self._flush_lock = threading.Lock(), threading.Lock()

    def begin(
        self,
        task_id: str,
        channel: str,
        details: Mapping[str, Any],
        first_seq: int = 0,
        *,
        run: Run,
        started_after: float | None = None,
    ) -> None:
        """Start sending for a task that was just marked STARTED: its ``started`` goes now.

        ``run`` names the send of the task its events are about (its message's ``run``);
        ``started_after``: the seconds after which its ``started`` goes, if not the
        outbox's (see :attr:`~nbtask.core.task.Task.started_after`).
        """
        alive = _thread_ids()
        with self._lock:
            if self._leftovers:  # (threads left running are rare: no new dict per task)
                self._leftovers = {t: owner for t, owner in self._leftovers.items() if t in alive}
            self._threads_before, self._active = alive, True
            self._task_id, self._channel, self._seq = task_id, channel, first_seq + 1
            self._run = run
            self._output, self._progress = [], None
            self._started = Event(EventType.STARTED, task_id, first_seq + 1, details, run=run)
            self._skipped = None
            self._due, self._first_at = -math.inf, self._clock()
            self._started_due = not self._timed
        if self._timed:
            self._alarm.arm(started_after)  # a new task begins with a cap of its own
        else:
            self._bell.ring()

    def emit(self, kind: str, data: Mapping[str, Any]) -> None:
        """Queue an event from task code: ``progress`` (coalesced), ``display`` or ``state``.

        ``display`` data is a MIME bundle: ``{"data": {mime: value}, "metadata": {...}}``
        (optionally ``"transient"``); it keeps its place among printed text.
        """
        if self._forked:
            return
        if kind == EventType.PROGRESS.value:
            with self._lock:
                self._wake_if_idle()
                self._progress = dict(data)
        elif kind in (EventType.DISPLAY.value, EventType.STATE.value):
            with self._lock:
                self._wake_if_idle()
                self._output.append((EventType(kind), dict(data)))
        else:
            raise ValueError(f"tasks cannot send {kind!r} events")

    def write(self, kind: EventType, text: str) -> bool:
        """Queue output text of the running task; False if it is not the task's.

        Text from a thread an earlier task left running is dropped (logged once per
        thread); text written while no task runs, or in a process forked from the child, is
        not queued (the caller shows it in the worker's log instead).
        """
        if self._forked:
            return False
        thread = threading.get_ident()
        with self._lock:
            owner = self._leftovers.get(thread)
            if owner is None and not self._active:
                return False
            if owner is not None:
                if owner:  # log once per thread, then remember it silently
                    log.warning("dropped output of a thread that task %s left running", owner)
                    self._leftovers[thread] = ""
                return True
            self._wake_if_idle()
            if self._output and self._output[-1][0] is kind:
                self._output[-1][1]["text"] += text
            else:
                self._output.append((kind, {"text": text}))
        return True

    def _buffered(self) -> bool:
        """Whether anything waits to be sent (lock held).

        A ``started`` counts once it is due: until then it only goes with other events.
        """
        started = self._started is not None and self._started_due
        return started or bool(self._output) or self._progress is not None

    def _wake_if_idle(self) -> None:
        """Before buffering: wake the outbox's thread if nothing was buffered (lock held).

        With something buffered it is awake already, waiting for the end of the cap.
        """
        if not self._buffered():
            self._first_at = self._clock()
            self._bell.ring()

    def end(self) -> int:
        """Flush what the task left and return the sequence number for its final event."""
        left = _thread_ids()
        if self._timed and not self._started_due:
            # An alarm that went off is spent (it fires once): only a task that ended
            # before its ``started`` was due costs the system call that disarms it.
            self._alarm.disarm()
        with self._lock:
            if not self._output and self._progress is None:
                # Alone, it would cost a round trip the final event saves.
                self._skipped, self._started = self._started, None
            self._active = False
            for thread in left - self._threads_before:
                self._leftovers[thread] = self._task_id
        self.flush()
        with self._lock:
            self._seq += 1
            return self._seq

    def send_skipped_start(self) -> None:
        """Send the ``started`` that :meth:`end` left out, if it did: no final event follows.

        For a run that ends without an outcome (it raised ``Ignore``): its handle then shows
        ``STARTED``, as the task's record does, on every broker.
        """
        with self._lock:
            skipped, self._skipped = self._skipped, None
        if skipped is not None and not self._forked:
            with self._flush_lock:
                self._send(self._channel, [skipped])

    def flush(self) -> None:
        """Send what is buffered now.

        Flushes are serialised end to end, so the final flush in :meth:`end` waits for
        one in progress: no output can reach the client after the final event. A forked
        copy of the child sends nothing.
        """
        if self._forked:
            return
        with self._flush_lock:
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            events = [] if self._started is None else [self._started]
            self._started = None
            for kind, data in _packed(self._output):
                self._seq += 1
                events.append(Event(kind, self._task_id, self._seq, data, run=self._run))
            if self._progress is not None:
                self._seq += 1
                progress = self._progress
                events.append(
                    Event(EventType.PROGRESS, self._task_id, self._seq, progress, run=self._run)
                )
            self._output, self._progress = [], None
            channel = self._channel
            if not events:
                return
            self._due = max(self._first_at, self._due + CAP_SECONDS)
        self._send(channel, events)

    def _send(self, channel: str, events: list[Event]) -> None:
        try:
            raws = [self._signer.seal(e.to_header()) for e in events]
            self._transport.emit(channel, raws)
        except BrokerUnavailable as exc:
            log.warning(
                "could not send %d event(s) of task %s: %s", len(events), self._task_id, exc
            )
        except Exception:
            # e.g. one display over max_message_bytes: drop these, keep streaming later ones.
            log.exception("could not send %d event(s) of task %s", len(events), self._task_id)

    def _pump(self) -> None:
        # Leading edge: what is buffered after a quiet spell goes out at once; what
        # follows within the cap waits for its end (the trailing edge) and goes together.
        while True:
            with self._lock:
                wait = None
                if self._buffered():
                    wait = self._due + CAP_SECONDS - self._clock()
            if wait is not None and wait <= 0:
                self.flush()
                continue
            # Or less: the bell (a new event) or the alarm (a task to announce) wakes it.
            _, expired = wait_for(self._bell, self._alarm, wait)
            if expired:
                with self._lock:
                    self._started_due = True


class TaskStream(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` of a worker child: a task's text goes to its client.

    Text written while no task runs (a handler after the outcome) goes to ``fallback``,
    the worker's own stream, a line at a time: the worker's log gets it as it is written,
    in order with the log records, even where that stream is a buffered file. While
    ``descriptors`` capture the task's descriptors 1 and 2, text written here takes its
    place after what they hold (see :mod:`~nbtask.worker.descriptors`).
    """

    def __init__(
        self,
        outbox: Outbox,
        kind: EventType,
        fallback: Any,
        journal: Journal | None = None,
        descriptors: DescriptorOutput | None = None,
    ) -> None:
        self._outbox, self._kind, self._fallback = outbox, kind, fallback
        self._journal = journal
        self._descriptors = descriptors

    def writable(self) -> bool:
        """Always: this stream only writes."""
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]  # (TextIOBase's says None)
        """UTF-8, as a kernel's streams say: the text goes to the client as text."""
        return "utf-8"

    def fileno(self) -> int:
        """The worker's own stream's descriptor (1 or 2).

        What is written to it directly (a subprocess handed this stream, ``faulthandler``)
        goes where that descriptor's other output goes: a ``%%task`` cell's output while
        one runs (see :mod:`~nbtask.worker.descriptors`), else the worker's log.
        """
        return int(self._fallback.fileno())

    def write(self, text: str) -> int:
        """Queue ``text`` for the running task's client (or the worker's log)."""
        descriptors = self._descriptors
        if descriptors is not None and descriptors.capturing:
            queued = descriptors.write(self._kind, text)
        else:
            queued = self._outbox.write(self._kind, text)
        if not queued:
            self._fallback.write(text)
            if "\n" in text:
                self._fallback.flush()
            if self._journal is not None:  # a handler's output, kept with its task
                self._journal.write(text)
        return len(text)

    def flush(self) -> None:
        """Flush the worker's own stream (a task's text is sent in batches anyway)."""
        self._fallback.flush()


def _packed(output: list[_Output]) -> list[_Output]:
    """A batch's outputs as few events: consecutive ones packed into ``output`` events.

    However often a task switches between stdout and stderr (a print and a log line in
    each turn of a loop), one send carries a few events, not one per switch: a client
    reads them far faster than it would thousands, and its channel, which keeps a bounded
    number of events, keeps the whole batch. A pack ends once its text passes
    :data:`PACK_CHARS` (a very large batch goes as several events of about that size,
    or of its largest output); a lone output goes as an event of its own kind.
    """
    events: list[_Output] = []
    pack: list[list[Any]] = []
    size = 0
    for kind, data in output:
        pack.append([kind.value, data])
        size += _size(kind, data)
        if size >= PACK_CHARS:
            events.append(_pack(pack))
            pack, size = [], 0
    if pack:
        events.append(_pack(pack))
    return events


def _pack(parts: list[list[Any]]) -> _Output:
    if len(parts) == 1:
        kind, data = parts[0]
        return EventType(kind), data
    return EventType.OUTPUT, {"parts": parts}


def _size(kind: EventType, data: Mapping[str, Any]) -> int:
    """About how many characters an output adds to an event (its text, a display's data)."""
    if kind is EventType.DISPLAY:
        bundle = data.get("data")
        values = bundle.values() if isinstance(bundle, dict) else ()
        return sum(len(v) if isinstance(v, str) else 64 for v in values)
    text = data.get("text")
    return len(text) if isinstance(text, str) else 64


def _disown(outbox: Outbox | None) -> None:
    if outbox is not None:
        outbox._disown()


def _thread_ids() -> set[int]:
    # threading's own table, not the threads with a Python frame now: a thread started in
    # C has one only while it calls back into Python, and would be taken for one the
    # ending task left running.
    return {thread.ident for thread in threading.enumerate() if thread.ident is not None}
