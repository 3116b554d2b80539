"""What a read of a client's event channels does, in whichever thread holds the turn.

A read (:mod:`nbtask.client.listener` says who reads, and when) keeps the client's own
channel alive, verifies each event before anything in it is used, applies it to the
handle it is for and moves past it. It also ends the handles whose events may have gone
unread (the channel trimmed them while nobody read, or the broker lost the tasks in an
outage), says a read error once per outage, and stops reading channels it adopted from
other clients once they fail or no handle needs them.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from nbtask.brokers import Transport
from nbtask.client.lost import LostTasks
from nbtask.core.handle import TaskHandle
from nbtask.errors import BrokerUnavailable
from nbtask.wire.envelope import Signer
from nbtask.wire.events import decode_event

__all__ = ["BLOCK_SECONDS", "EventReads"]

# The listener's log lines, whichever thread reads (users filter on this name).
log = logging.getLogger("nbtask.client.listener")
_KEEPALIVE_SECONDS = 60.0
#: Longest single blocking read; a reader checks keepalive and turn-taking in between.
BLOCK_SECONDS = 5.0
#: An entry id this far past the clock (clocks of hosts differ by far less) is not one
#: Redis gave an event.
_AHEAD_SECONDS = 86_400.0
#: A read this large, or one after no read for this long (the process was stopped, or
#: starved), may follow events the channel trimmed unread: the transport is asked.
_BACKLOG_EVENTS = 100
_STALLED_SECONDS = 2 * BLOCK_SECONDS


class EventReads:
    """The reading part of :class:`~nbtask.client.listener.Listener`.

    Only the holder of the turn reads, so these run in one thread at a time.
    """

    _transport: Transport
    _signer: Signer
    channel: str
    _prefix: str
    _recover: Callable[[list[TaskHandle]], None] | None
    _lost: LostTasks | None
    _last_read: float
    _recovery_due: bool
    _positions: dict[str, str]
    _handles: dict[str, TaskHandle]
    _lock: threading.RLock
    _reading: threading.local
    _failing: bool
    _failed_at: float
    _failed_with: str
    _next_keepalive: float

    def unfinished(self) -> list[TaskHandle]:
        """The registered handles not ended yet."""
        with self._lock:
            return [handle for handle in self._handles.values() if not handle.done()]

    # Reading (by the holder of the turn) -------------------------------------------------------
    def _read(self, block_seconds: float) -> bool:
        """One blocking read and the dispatch of what it brought; False after an error.

        The channel is a stream and the positions are kept: after the broker is back (or
        the error passes), every event sent meanwhile is read, so no final state is
        missed. No reader dies of an error.
        """
        self._reading.now = True
        try:
            return self._read_and_apply(block_seconds)
        finally:
            self._reading.now = False

    def _read_and_apply(self, block_seconds: float) -> bool:
        try:
            if time.monotonic() >= self._next_keepalive:
                self._transport.keep_channel(self.channel)
                self._next_keepalive = time.monotonic() + _KEEPALIVE_SECONDS
            with self._lock:
                positions = dict(self._positions)
            stalled = time.monotonic() - self._last_read >= _STALLED_SECONDS
            entries = self._transport.read_events(positions, block_seconds=block_seconds)
            self._last_read = time.monotonic()
        except Exception as exc:
            if not isinstance(exc, BrokerUnavailable) and self._drop_adopted_channels(exc):
                return True
            self._say_read_error(exc)
            return False
        recovered = False
        if self._failing:  # (set only by the holder of the turn: this thread)
            with self._lock:
                recovered, self._failing = self._failing, False
        if recovered:
            gone = time.monotonic() - self._failed_at
            log.warning("event channel readable again after %.1f s", gone)
            if self._lost is not None:
                self._lost.outage_ended()
        for channel, entry_id, raw in entries:
            # Past an event only once it is applied: a Ctrl-C in a waiting thread that
            # reads must not skip one (it is read again; a handle ignores what it has).
            if raw and self._dispatch(raw):
                # Only a verified event's position may count (RabbitMQ: see amqp_overlap).
                self._transport.event_verified(channel, entry_id)
            if _past_the_clock(entry_id):
                # Redis numbers entries by its clock: one this far ahead was put there by
                # someone else, and the events after it are numbered after it (or not at
                # all: the channel is then replaced). Deleted, not moved past, so those
                # events are still read.
                self._transport.store.drop_event(channel, entry_id)
                continue
            with self._lock:
                self._positions[channel] = entry_id
        self._recover_lost(positions, entries, stalled)
        self._look_for_lost()
        self._drop_idle_channels()
        return True

    def _recover_lost(
        self, before: dict[str, str], entries: list[tuple[str, str, bytes]], stalled: bool
    ) -> None:
        """After a read that may follow a gap, end the handles whose events went unread.

        A channel keeps a bounded number of events: a client that does not read for a
        while (a stopped process, a kernel holding the GIL) loses the oldest, final ones
        included. Their tasks' records still hold the outcomes. If the broker fails
        meanwhile, the records are read at a later read.
        """
        if self._recover is None:
            return
        if not (stalled or self._recovery_due or len(entries) >= _BACKLOG_EVENTS):
            return  # the usual read: a few events, right after the last
        counts = collections.Counter(channel for channel, _, _ in entries)
        asked = [c for c in before if stalled or counts[c] >= _BACKLOG_EVENTS]
        try:
            if not self._recovery_due:
                self._recovery_due = any(self._transport.events_lost(c, before[c]) for c in asked)
            if not self._recovery_due:
                return
            with self._lock:
                handles = [h for h in self._handles.values() if not h.done()]
            log.warning(
                "events of this client were trimmed before it read them (it did not read "
                "for a while); taking the outcomes of its %d unfinished tasks from their "
                "records",
                len(handles),
            )
            self._recover(handles)
            self._recovery_due = False
        except Exception as exc:
            self._recovery_due = True
            log.warning("could not look for events trimmed unread (%s); trying again", exc)
        self._forget_done()

    def _look_for_lost(self) -> None:
        """After an outage, end the handles of tasks the broker lost (see LostTasks)."""
        if self._lost is None or not self._lost.due():
            return
        try:
            self._lost.look(self.unfinished())
        except Exception as exc:  # due still: looked at after a later read
            log.warning("could not look for tasks lost in the outage (%s); trying again", exc)
        self._forget_done()

    def _forget_done(self) -> None:
        with self._lock:
            for task_id, handle in list(self._handles.items()):
                if handle.done():
                    del self._handles[task_id]

    def _say_read_error(self, exc: Exception) -> None:
        """Log a read error once per outage, not at every retry of the backoff.

        Said again when what fails changes (the broker back, the store still away): what
        failed is the message's first part (``cannot reach the Redis store at ...``).
        """
        with self._lock:
            first, self._failing = not self._failing, True
        failed_with = str(exc).partition(": ")[0]
        if not first and failed_with == self._failed_with:
            return
        self._failed_at = time.monotonic() if first else self._failed_at
        self._failed_with = failed_with
        if isinstance(exc, BrokerUnavailable):
            log.warning("event channel unreachable (%s); retrying until it is back", exc)
        else:
            log.exception("error reading the event channel; retrying until it reads")

    def _dispatch(self, raw: bytes) -> bool:
        """Apply one event to its handle, if it has one; whether the event verified."""
        try:
            event, result = decode_event(self._signer, raw, self._transport.store.get_blob)
        except Exception as exc:
            log.warning("dropped an event that does not verify: %s", exc)
            return False
        with self._lock:
            handle = self._handles.get(event.task_id)
        if handle is None:
            return True
        why = handle.refusal(event, self._prefix)
        if why is not None:
            log.warning("dropped an event of task %s: %s", event.task_id, why)
            return True
        try:
            handle.apply(event, result)
        except Exception:
            log.exception("error while applying %s to task %s", event.type.value, event.task_id)
        if handle.done():
            with self._lock:
                self._handles.pop(event.task_id, None)
        return True

    def _drop_adopted_channels(self, exc: Exception) -> bool:
        """After a read error that is not an outage, stop reading other clients' channels.

        Their names come from unsigned records: one naming a key that is not a channel
        must not stop this client's own events. Returns whether any were dropped.
        """
        with self._lock:
            adopted = [c for c in self._positions if c != self.channel]
            if not adopted:
                return False
            self._positions = {self.channel: self._positions[self.channel]}
        log.error("stopped reading %s after a read error (%s)", ", ".join(adopted), exc)
        return True

    def _drop_idle_channels(self) -> None:
        # Adopted channels are read only while a handle that needs them is unfinished.
        if len(self._positions) == 1:  # only its own channel: nothing to drop
            return
        with self._lock:
            if len(self._positions) > 1 and not self._handles:
                self._positions = {self.channel: self._positions[self.channel]}


def _past_the_clock(entry_id: str) -> bool:
    """Whether a channel's entry id is more than :data:`_AHEAD_SECONDS` past this clock."""
    millis, _, _ = entry_id.partition("-")
    return millis.isdigit() and int(millis) > (time.time() + _AHEAD_SECONDS) * 1000
