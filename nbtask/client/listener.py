"""The client's event reading: one reader at a time, the waiting thread itself when it can.

Events of every task of a client come on its one channel (a stream), read by whichever
thread holds the *turn*: a thread waiting in ``handle.get()`` reads them itself when no
other thread is reading (so its result reaches it with one wake-up, not three), and
applies whatever it reads to the handles it is for; when no thread waits, the listener
thread reads, so handles nobody waits on (callbacks, ``concurrent.futures.wait``) are
served too. Only the holder of the turn reads, verifies, applies and moves the stream
positions, so events are applied once each and in order whoever reads them. What a
read does is :mod:`nbtask.client.event_reads`'s; here is who reads, and when.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Callable

from nbtask.brokers import Transport
from nbtask.client.event_reads import BLOCK_SECONDS, EventReads
from nbtask.client.lost import LostTasks
from nbtask.core.handle import TaskHandle
from nbtask.errors import BrokerUnavailable
from nbtask.wire.envelope import Signer

__all__ = ["Listener"]

#: How long the listener thread leaves the turn to a thread about to wait, once a handle
#: needs serving: a ``get()`` right after ``delay()`` then reads its own result, even on a
#: busy machine. About a round trip, so an event of a handle nobody waits on is held back
#: a millisecond or two at most (while threads wait, see below: until the next look).
_GRACE_SECONDS = 0.002
#: While threads wait for results (and this long after the last one), sending does not
#: wake the listener thread: it looks every :data:`_RECHECK_SECONDS` instead, so a loop of
#: ``delay().get()`` does not cost a thread wake-up per task. Each look is a wake-up too:
#: every 2 ms was one per one or two round trips, a third of the client's context switches
#: and some 30 us of its CPU per round trip on a busy machine. A handle that a thread
#: sends meanwhile and nobody waits on is served by the waiting threads' reads while they
#: go on, else at the next look.
_ACTIVE_SECONDS = 0.05
_RECHECK_SECONDS = 0.01


class Listener(EventReads):
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
        # Keyed by the handle object: handles of one task are equal (they compare by id).
        self._watched: weakref.WeakValueDictionary[int, TaskHandle] = weakref.WeakValueDictionary()
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
                            if id(handle) not in self._watched:  # settled off the turn: wake
                                self._watched[id(handle)] = handle
                                handle.add_done_callback(self._wake_waiters)
                            self._waiters_turn.wait(left)
                            continue
                        else:
                            return
                    self._read(min(left, BLOCK_SECONDS) if left is not None else BLOCK_SECONDS)
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
                block = BLOCK_SECONDS if self._handles or idle else 0.001
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
                sleep = BLOCK_SECONDS
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


def _waited_for(handle: TaskHandle, until: Callable[[], bool] | None) -> bool:
    """Whether a thread waiting for ``handle`` (or ``until()``) need wait no more."""
    return handle.done() or (until is not None and until())
