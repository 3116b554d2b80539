"""The client's one listener thread: reads its event channel and feeds task handles."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from nbtask.brokers import Transport
from nbtask.core.handle import TaskHandle
from nbtask.errors import BrokerUnavailable
from nbtask.wire.envelope import Signer
from nbtask.wire.events import decode_event

__all__ = ["Listener"]

log = logging.getLogger(__name__)
_KEEPALIVE_SECONDS = 60.0


class Listener:
    """Dispatches events from the client's channel (and any adopted ones) to handles.

    Parameters
    ----------
    transport
        The transport to read from; the listener uses it from its own thread only.
    signer
        Verifies every event before anything in it is used.
    channel
        This client's event channel.
    """

    def __init__(self, transport: Transport, signer: Signer, channel: str) -> None:
        self._transport = transport
        self._signer = signer
        self.channel = channel
        self._positions: dict[str, str] = {channel: "0-0"}
        self._handles: dict[str, TaskHandle] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nbtask-listener", daemon=True)
        self._thread.start()

    def register(self, handle: TaskHandle, channel: str | None = None, after: str = "0-0") -> None:
        """Route events for ``handle`` to it; ``channel`` adopts another client's channel."""
        with self._lock:
            self._handles[handle.id] = handle
            if channel is not None and channel not in self._positions:
                self._positions[channel] = after
        if channel is not None and channel != self.channel:
            self._transport.wake(self.channel)

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
        with contextlib.suppress(BrokerUnavailable):
            self._transport.wake(self.channel)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """True while the thread runs."""
        return self._thread.is_alive()

    def _run(self) -> None:
        backoff = 0.1
        next_keepalive = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_keepalive:
                    self._transport.keep_channel(self.channel)
                    next_keepalive = time.monotonic() + _KEEPALIVE_SECONDS
                with self._lock:
                    positions = dict(self._positions)
                entries = self._transport.read_events(positions, block_seconds=5.0)
                backoff = 0.1
            except Exception as exc:
                # The channel is a stream and we keep our position: after the broker is
                # back (or the error passes), every event sent meanwhile is read, so no
                # final state is missed. The thread itself never dies of it.
                if isinstance(exc, BrokerUnavailable):
                    log.warning("event channel unreachable (%s); retrying in %.1f s", exc, backoff)
                elif self._drop_adopted_channels(exc):
                    continue
                else:
                    log.exception("error reading the event channel; retrying in %.1f s", backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            for channel, entry_id, raw in entries:
                with self._lock:
                    self._positions[channel] = entry_id
                if raw:
                    self._dispatch(raw)
            self._drop_idle_channels()

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
        with self._lock:
            if len(self._positions) > 1 and not self._handles:
                self._positions = {self.channel: self._positions[self.channel]}
