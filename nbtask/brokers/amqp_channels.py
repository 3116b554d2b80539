"""A client's event channels on AMQP: its reply queue, and adopted channels' streams.

Part of :class:`~nbtask.brokers.amqp.AmqpTransport`. Events for a client are kept on its
stream in the Redis store and published to its reply queue (:mod:`~.amqp_replies`),
each with the id it was kept under beside it; a channel the client adopted (a task of
another client, re-attached) is read from its stream alone.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from nbtask.brokers.amqp_guards import ENTRY_HEADER
from nbtask.brokers.amqp_link import Link
from nbtask.brokers.amqp_links import Links
from nbtask.brokers.amqp_replies import Replies
from nbtask.brokers.redis_store import RedisStore

__all__ = ["AmqpChannels"]


class AmqpChannels:
    """Reading and publishing the events of clients' channels, on ``links``."""

    links: Links
    replies: Replies
    _own_channels: set[str]
    _store: RedisStore

    def read_events(
        self, channels: Mapping[str, str], block_seconds: float
    ) -> list[tuple[str, str, bytes]]:
        """Events of this client's reply queue, and of adopted channels (from the store).

        A channel this transport keeps alive (:meth:`keep_channel`) is read from its AMQP
        reply queue; any other from the store's stream.
        """
        own = [c for c in channels if c in self._own_channels]
        foreign = {c: p for c, p in channels.items() if c not in self._own_channels}
        deadline = time.monotonic() + block_seconds
        while True:
            out: list[tuple[str, str, bytes]] = []
            remaining = deadline - time.monotonic()
            if own:
                out += self.replies.read(own[0], 0.0 if foreign else max(remaining, 0.0))
            if foreign:
                out += self._store.read_events(foreign, 0.001) if not out else []
            remaining = deadline - time.monotonic()
            if out or remaining <= 0:
                return out
            if foreign and own:
                out = self.replies.read(own[0], min(0.25, remaining))
                if out:
                    return out
            elif foreign:
                return self._store.read_events(foreign, min(remaining, 0.5))

    def events_lost(self, channel: str, after: str) -> bool:
        """Whether events of ``channel`` went unread (trimmed from its stream).

        For this client's own channel: its reply queue went (a dropped connection) and the
        stream trimmed some before the catch-up read them. For an adopted channel: the
        stream trimmed some after ``after``.
        """
        if channel in self._own_channels:
            return self.replies.take_lost(channel)
        return self._store.trimmed_after(channel, after)

    def event_verified(self, channel: str, entry_id: str) -> None:
        """Note that an event read verified: the position beside it may be used (own channels)."""
        if channel in self._own_channels:
            self.replies.verified(channel, entry_id)

    def wake(self, channel: str) -> None:
        """Send an empty event so a reader blocked on ``channel`` returns."""
        if channel in self._own_channels:
            self.notify(channel, [b""])
        else:
            self._store.wake(channel)

    def keep_channel(self, channel: str) -> None:
        """Mark ``channel`` as this client's own (read from AMQP) and keep its stream."""
        self._own_channels.add(channel)
        self._store.keep_channel(channel)

    def notify(
        self,
        channel: str,
        raw_events: Sequence[bytes],
        *,
        wait: bool = True,
        entries: Sequence[str] = (),
    ) -> None:
        """Publish events to a client's reply queue (dropped if the client is gone).

        Without ``wait`` the confirms are collected later, by the thread's next use of
        its link; events a dropped connection left unconfirmed are sent again then.
        ``entries``: none, or the id each event was kept under on the client's stream
        (``''`` where unknown), sent beside it (:data:`~.amqp_guards.ENTRY_HEADER`).
        """
        kept = entries or [""] * len(raw_events)

        def send(link: Link) -> None:
            for raw, entry in zip(raw_events, kept, strict=True):
                headers = {ENTRY_HEADER: entry} if entry else None
                self.links.send(link, channel, raw, persistent=False, headers=headers)

        self.links.publishing(send, wait=wait)
