"""A task's outbox: buffers its output, progress and state reports, sends them in batches."""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from nbtask.brokers import Transport
from nbtask.errors import BrokerUnavailable
from nbtask.wire.envelope import Signer
from nbtask.wire.events import Event, EventType

__all__ = ["Outbox", "TaskStream"]

log = logging.getLogger("nbtask.worker")
_FLUSH_SECONDS = 1 / 15  # the widget repaints at most ~15 times a second anyway


class Outbox:
    """Buffers a running task's events and sends them ~15 times a second.

    Output is concatenated and progress is coalesced (the latest value wins). The
    ``started`` event goes out with the first flush, about 1/15 s into the task; a task
    that ends sooner skips it (its final event names the worker). Everything buffered is
    flushed before the final event, so nothing a task printed is lost.
    """

    def __init__(self, transport: Transport, signer: Signer) -> None:
        self._transport = transport
        self._signer = signer
        self._lock = threading.Lock()
        self._task_id = ""
        self._channel = ""
        self._seq = 0
        self._started: Event | None = None
        # Output in the order produced: stdout/stderr text (adjacent chunks merged) and
        # rich displays. Progress is kept apart because only its latest value matters.
        self._output: list[tuple[EventType, dict[str, Any]]] = []
        self._progress: dict[str, Any] | None = None
        self._wake = threading.Event()
        self._flush_lock = threading.Lock()
        threading.Thread(target=self._pump, name="nbtask-outbox", daemon=True).start()

    def begin(
        self, task_id: str, channel: str, details: Mapping[str, Any], first_seq: int = 0
    ) -> None:
        """Start buffering for a task that was just marked STARTED."""
        with self._lock:
            self._task_id, self._channel, self._seq = task_id, channel, first_seq + 1
            self._output, self._progress = [], None
            self._started = Event(EventType.STARTED, task_id, first_seq + 1, details)
        self._wake.set()

    def emit(self, kind: str, data: Mapping[str, Any]) -> None:
        """Queue an event from task code: ``progress`` (coalesced), ``display`` or ``state``.

        ``display`` data is a MIME bundle: ``{"data": {mime: value}, "metadata": {...}}``
        (optionally ``"transient"``); it keeps its place among printed text.
        """
        if kind == EventType.PROGRESS.value:
            with self._lock:
                self._progress = dict(data)
        elif kind in (EventType.DISPLAY.value, EventType.STATE.value):
            with self._lock:
                self._output.append((EventType(kind), dict(data)))
        else:
            raise ValueError(f"tasks cannot send {kind!r} events")
        self._wake.set()

    def write(self, kind: EventType, text: str) -> None:
        """Queue output text."""
        with self._lock:
            if self._output and self._output[-1][0] is kind:
                self._output[-1][1]["text"] += text
            else:
                self._output.append((kind, {"text": text}))
        self._wake.set()

    def end(self) -> int:
        """Flush what the task left and return the sequence number for its final event."""
        with self._lock:
            self._started = None
        self.flush()
        with self._lock:
            self._seq += 1
            return self._seq

    def flush(self) -> None:
        """Send what is buffered now.

        Flushes are serialised end to end, so the final flush in :meth:`end` waits for
        one in progress: no output can reach the client after the final event.
        """
        with self._flush_lock:
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            events = [] if self._started is None else [self._started]
            self._started = None
            for kind, data in self._output:
                self._seq += 1
                events.append(Event(kind, self._task_id, self._seq, data))
            if self._progress is not None:
                self._seq += 1
                events.append(Event(EventType.PROGRESS, self._task_id, self._seq, self._progress))
            self._output, self._progress = [], None
            channel = self._channel
        if not events:
            return
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
        while True:
            self._wake.wait()
            time.sleep(_FLUSH_SECONDS)
            self._wake.clear()
            self.flush()


class TaskStream(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` inside a task: text goes to the client."""

    def __init__(self, outbox: Outbox, kind: EventType) -> None:
        self._outbox, self._kind = outbox, kind

    def writable(self) -> bool:
        """Always: this stream only writes."""
        return True

    def write(self, text: str) -> int:
        """Queue ``text`` for the client."""
        self._outbox.write(self._kind, text)
        return len(text)
