"""The client's event reading: one reader at a time, the waiting thread itself when it can.

Events of every task of a client come on its one channel (a stream), read by whichever
thread holds the *turn*: a thread waiting in ``handle.get()`` reads them itself when no
other thread is reading (so its result reaches it with one wake-up, not three), and
applies whatever it reads to the handles it is for; when no thread waits, the listener
thread reads, so handles nobody waits on (callbacks, ``concurrent.futures.wait``) are
served too. Only the holder of the turn reads, verifies, applies and moves the stream
positions, so events are applied once each and in order whoever reads them.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable

from nbtask.brokers import Transport
from nbtask.client.lost import LostTasks
from nbtask.core.handle import TaskHandle
from nbtask.errors import BrokerUnavailable
from nbtask.wire.envelope import Signer
from nbtask.wire.events import decode_event

__all__ = ["Listener"]

log = logging.getLogger(__name__)
_KEEPALIVE_SECONDS = 60.0
#: Longest single blocking read; a reader checks keepalive and turn-taking in between.
_BLOCK_SECONDS = 5.0
#: How long the listener thread leaves the turn to a thread about to wait, once a handle
#: needs serving: a ``get()`` right after ``delay()`` then reads its own result, even on a
#: busy machine. About a round trip, so an event of a handle nobody waits on is held back
#: a millisecond or two at most.
_GRACE_SECONDS = 0.002
#: While threads wait for results (and this long after the last one), sending does not
#: wake the listener thread: it looks every :data:`_RECHECK_SECONDS` instead, so a loop of
#: ``delay().get()`` does not cost a thread wake-up per task.
_ACTIVE_SECONDS = 0.05
_RECHECK_SECONDS = 0.002
#: An entry id this far past the clock (clocks of hosts differ by far less) is not one
#: Redis gave an event.
_AHEAD_SECONDS = 86_400.0
#: A read this large, or one after no read for this long (the process was stopped, or
#: starved), may follow events the channel trimmed unread: the transport is asked.
_BACKLOG_EVENTS = 100
_STALLED_SECONDS = 2 * _BLOCK_SECONDS


class Listener:
    """Dispatches events from the client's channel (and any adopted ones) to handles.

    Parameters
    ----------
    transport
        The transport to read from (one connection per reading thread).
    signer
        Verifies every event before anything in it is used.
    channel
        This client's event channel.
    prefix
        The app's key prefix: only events about its tasks are taken.
    recover
        Given the unfinished handles when events may have gone unread (the channel
        trimmed them while nobody read it), ends those whose tasks' records hold their
        outcomes.
    lost
        Looks, once the broker answers again after an outage, for tasks it lost.
    """

    def __init__(
        self,
        transport: Transport,
        signer: Signer,
        channel: str,
        prefix: str,
        recover: Callable[[list[TaskHandle]], None] | None = None,
        lost: LostTasks | None = None,
    ) -> None:
        self._transport = transport
        self._signer = signer
        self.channel = channel
        self._prefix = prefix
        self._recover = recover
        self._lost = lost
        self._last_read = time.monotonic()  # when the last read returned
        self._recovery_due = False  # events went unread; their records are still to read
        self._positions: dict[str, str] = {channel: "0-0"}
        self._handles: dict[str, TaskHandle] = {}
        self._lock = threading.RLock()  # a done callback may run while it is held
        # The turn: who reads now (None: nobody), and the threads waiting for a result.
        self._reader: threading.Thread | None = None
        # A set, not a count: a Ctrl-C between a waiter's steps cannot leave it counted.
        self._waiting: set[threading.Thread] = set()
        self._reading = threading.local()  # whether this thread is inside a read now
        # Handles whose end wakes the waiting threads (a revoke settles one off the turn):
        # hooked once each, however often a get() with a timeout comes back to wait.
        self._watched: weakref.WeakSet[TaskHandle] = weakref.WeakSet()
        self._listener_turn = threading.Condition(self._lock)
        self._waiters_turn = threading.Condition(self._lock)
        # After a read error only the listener thread reads, with its backoff, until a
        # read succeeds: waiters wait for it instead of retrying at once.
        self._failing = False
        self._failed_at = 0.0  # when the current run of read errors began
        self._failed_with = ""  # what the last read error said failed
        # Since when a registered handle has had no reader (None: it has one, or none is
        # registered), and until when waiting threads count as active (see above).
        self._unserved_since: float | None = None
        self._active_until = 0.0
        self._parked = False  # the listener thread sleeps until told
        self._next_keepalive = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nbtask-listener", daemon=True)
        self._thread.start()

    def register(
        self, handle: TaskHandle, channel: str | None = None, after: str = "0-0"
    ) -> TaskHandle | None:
        """Route events for ``handle`` to it; ``channel`` adopts another client's channel.

        Returns the unfinished handle it replaces for that task id, if any.
        """
        with self._lock:
            before = self._handles.get(handle.id)
            self._handles[handle.id] = handle
            if channel is not None and channel not in self._positions:
                self._positions[channel] = after
            if self._reader is None and self._unserved_since is None:
                self._unserved_since = now = time.monotonic()
                if not self._waiting and (self._parked or now >= self._active_until):
                    self._listener_turn.notify()
        if channel is not None and channel != self.channel:
            self._transport.wake(self.channel)
        return before

    def forget(self, task_id: str) -> None:
        """Stop routing events to the handle of ``task_id``."""
        with self._lock:
            self._handles.pop(task_id, None)

    def unfinished(self) -> list[TaskHandle]:
        """The registered handles not ended yet."""
        with self._lock:
            return [handle for handle in self._handles.values() if not handle.done()]

    def get(self, task_id: str) -> TaskHandle | None:
        """The registered, unfinished handle for ``task_id``."""
        with self._lock:
            return self._handles.get(task_id)

    def close(self, timeout: float = 2.0) -> None:
        """Stop the thread (it wakes at once) and wait for it."""
        self._stop.set()
        with self._lock:
            self._listener_turn.notify_all()
            self._waiters_turn.notify_all()
        # A broker that does not answer must not hold up the close: the thread is left.
        with contextlib.suppress(BrokerUnavailable), self._transport.answers_within(timeout):
            self._transport.wake(self.channel)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """True while the thread runs."""
        return self._thread.is_alive()

    # Waiting threads ---------------------------------------------------------------------
    def wait_for(
        self,
        handle: TaskHandle,
        timeout: float | None,
        until: Callable[[], bool] | None = None,
    ) -> None:
        """Read events on this thread until ``handle`` is done, or ``timeout`` passes.

        ``until``: also return once it is true, checked after each read (this thread's or
        another's), for a caller that takes the handle's events as they come.

        While another thread reads, wait for it to apply the handle's events, or to hand
        the turn on. Returns early, the handle not done, when this thread cannot read
        (the listener is stopped, the transport is read by one thread only, or this
        thread is applying events already: a callback waiting on a task); the caller then
        waits on the handle alone.
        """
        if not self._transport.events_from_any_thread:
            return
        me = threading.current_thread()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            with self._lock:
                if self._reader is me:
                    if getattr(self._reading, "now", False):
                        return  # a callback of this thread's own read
                    self._reader = None  # left by a read a Ctrl-C cut: take it up again
                self._waiting.add(me)
                self._note_active()
            while not _waited_for(handle, until) and not self._stop.is_set():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return
                try:
                    with self._lock:
                        if self._reader is None and not self._failing:
                            self._take(me)
                        elif not handle.done():
                            if handle not in self._watched:  # settled off the turn: wake
                                self._watched.add(handle)
                                handle.add_done_callback(self._wake_waiters)
                            self._waiters_turn.wait(left)
                            continue
                        else:
                            return
                    self._read(min(left, _BLOCK_SECONDS) if left is not None else _BLOCK_SECONDS)
                finally:
                    self._hand_on(me)
        finally:
            self._stop_waiting(me)

    def _stop_waiting(self, me: threading.Thread) -> None:
        """``me`` waits no more; a turn it still holds (a Ctrl-C cut its hand-on) goes too."""
        with self._lock:
            self._waiting.discard(me)
            if self._reader is me and not getattr(self._reading, "now", False):
                self._release()
            if not self._waiting and self._reader is None and self._handles:
                self._unserved_since = self._unserved_since or time.monotonic()
            self._note_active()

    def _note_active(self) -> None:
        # With the lock held: a thread starts or stops waiting.
        self._active_until = time.monotonic() + _ACTIVE_SECONDS
        if self._parked:
            self._listener_turn.notify()

    def _take(self, reader: threading.Thread) -> None:
        # With the lock held: ``reader`` reads now, for every registered handle.
        self._reader = reader
        self._unserved_since = None

    def _wake_waiters(self, _handle: object) -> None:
        with self._lock:
            self._waiters_turn.notify_all()

    def _hand_on(self, reader: threading.Thread) -> None:
        """``reader`` gives up the turn (if it has it): to a waiting thread, else the listener."""
        with self._lock:
            if self._reader is reader:
                self._release()

    def _release(self) -> None:
        # With the lock held, by the holder of the turn.
        self._reader = None
        if self._handles and not self._waiting:
            self._unserved_since = self._unserved_since or time.monotonic()
        self._waiters_turn.notify_all()
        if self._failing:
            self._listener_turn.notify()

    # The listener thread -------------------------------------------------------------------
    def _run(self) -> None:
        backoff, again = 0.1, False
        while not self._stop.is_set():
            if not self._take_turn(again):
                again = False
                continue
            with self._lock:  # a keepalive while threads wait: no blocking read
                idle = time.monotonic() >= self._active_until
                block = _BLOCK_SECONDS if self._handles or idle else 0.001
            try:
                again = self._read(block)
            finally:
                self._hand_on(threading.current_thread())
            if again:
                backoff = 0.1
            else:
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _take_turn(self, again: bool) -> bool:
        """Wait until the listener thread should read; True once it holds the turn.

        It reads when nobody else does, no thread waits for a result, and a handle has had
        no reader for :data:`_GRACE_SECONDS` (at once if the listener itself just read and
        no thread waited lately),
        or no handle is registered and no thread waited lately (it drains the channel),
        or the channel's keepalive is due; after a read error, at once.
        """
        with self._lock:
            now = time.monotonic()
            if self._reader is not None and not self._reader.is_alive():
                self._reader = None  # a thread that ended while it read
            if self._reader is None and not self._stop.is_set():
                serve = not self._waiting and (
                    now >= self._next_keepalive
                    # A thread that waited just now may be back at once, between the
                    # events it takes one by one: it is left the grace below.
                    or (again and bool(self._handles) and now >= self._active_until)
                    or (not self._handles and now >= self._active_until)  # idle: drain
                    or (
                        self._unserved_since is not None
                        and now - self._unserved_since >= _GRACE_SECONDS
                    )
                )
                if serve or self._failing:
                    self._take(threading.current_thread())
                    return True
            if self._waiting or self._reader is not None:
                # Another thread reads (and keeps the channel): until it is done.
                sleep = _BLOCK_SECONDS
            else:
                sleep = self._next_keepalive - now
            if self._unserved_since is not None and not self._waiting and self._reader is None:
                sleep = min(sleep, self._unserved_since + _GRACE_SECONDS - now)
            elif now < self._active_until:
                sleep = min(sleep, _RECHECK_SECONDS)
            self._parked = sleep > _RECHECK_SECONDS
            self._listener_turn.wait(max(sleep, 0.0))
            self._parked = False
            return False

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
            if raw:
                self._dispatch(raw)
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

    def _dispatch(self, raw: bytes) -> None:
        try:
            event, result = decode_event(self._signer, raw, self._transport.store.get_blob)
        except Exception as exc:
            log.warning("dropped an event that does not verify: %s", exc)
            return
        with self._lock:
            handle = self._handles.get(event.task_id)
        if handle is None:
            return
        why = handle.refusal(event, self._prefix)
        if why is not None:
            log.warning("dropped an event of task %s: %s", event.task_id, why)
            return
        try:
            handle.apply(event, result)
        except Exception:
            log.exception("error while applying %s to task %s", event.type.value, event.task_id)
        if handle.done():
            with self._lock:
                self._handles.pop(event.task_id, None)

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


def _waited_for(handle: TaskHandle, until: Callable[[], bool] | None) -> bool:
    """Whether a thread waiting for ``handle`` (or ``until()``) need wait no more."""
    return handle.done() or (until is not None and until())
