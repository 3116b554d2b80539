"""A client's own reply queue on AMQP, and the catch-up from its stream in the store.

Events for a client are kept on its stream in the store, then published to its exclusive
auto-delete reply queue. The queue is declared when the client first reads, and again on
each new connection; what was sent while it did not exist is read from the stream. An
event both ways bring (kept before that catch-up and published after the queue began, or
received live shortly before a reconnect) is handed over once (:mod:`~.amqp_overlap`),
which also says where a catch-up starts: each event comes with the id it was kept under
on the stream.

The queue's name is in every record of the client's tasks, so anyone with store access
can declare it first, exclusive to their own connection (or with other properties), and
RabbitMQ then refuses it to the client. The client then says so once and reads its events
from the stream, trying its queue again every :data:`RETRY_SECONDS`.

Anyone who can publish to RabbitMQ can also fill the queue. A read takes what the Redis
channels' read takes (:data:`~nbtask.brokers.redis_channels.READ_COUNT` messages and
:func:`~nbtask.brokers.redis_channels.read_budget` bytes at most; the rest waits for the
next reads), and a message larger than any event a client accepts (``max_message_bytes``)
is never read whole: its body is dropped as it arrives, with one log line
(:class:`~nbtask.brokers.amqp_reads.BodyLimits`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time

from amqp.exceptions import PreconditionFailed, ResourceLocked

from nbtask.brokers.amqp_guards import body_of, entry_of, oversized
from nbtask.brokers.amqp_link import Link
from nbtask.brokers.amqp_links import Links, kombu
from nbtask.brokers.amqp_overlap import Overlap
from nbtask.brokers.amqp_reads import BodyLimits
from nbtask.brokers.redis_channels import READ_COUNT, read_budget
from nbtask.brokers.redis_store import RedisStore
from nbtask.errors import BrokerUnavailable

__all__ = ["RETRY_SECONDS", "Replies"]

log = logging.getLogger(__name__)

#: Seconds between attempts to declare a reply queue someone else holds.
RETRY_SECONDS = 10.0
#: How the consumer tags of reply queues start: their bodies are screened by size.
_TAG_PREFIX = "nbtask-reply-"

Events = list[tuple[str, str, bytes]]


class _Taken(Exception):
    """The reply queue is held by another connection, or declared otherwise."""


class Replies:
    """The reply queues of one transport's clients.

    Parameters
    ----------
    links
        The transport's AMQP connections.
    store
        The Redis store keeping every client's events.
    """

    def __init__(self, links: Links, store: RedisStore) -> None:
        self.links = links
        self.store = store
        self._positions: dict[str, str] = {}  # in the store's stream, by channel
        self._ids = itertools.count(1)
        self._taken: dict[str, float] = {}  # channel: when to try declaring it again
        self._lost: set[str] = set()  # channels whose stream trimmed events unread
        # What both the catch-up and the queue bring is handed over once, by channel.
        self._overlaps: dict[str, Overlap] = {}

    def take_lost(self, channel: str) -> bool:
        """Whether a catch-up of ``channel`` found events trimmed unread since it last said."""
        if channel not in self._lost:
            return False
        self._lost.discard(channel)
        return True

    def _note_trimmed(self, channel: str, after: str) -> None:
        # A catch-up reads the stream from ``after``: what it trimmed meanwhile is gone.
        if after != "0-0" and self.store.trimmed_after(channel, after):
            self._lost.add(channel)

    def read(self, channel: str, block_seconds: float) -> Events:
        """Events of ``channel``'s reply queue (or its stream, while the queue is taken)."""
        if time.monotonic() < self._taken.get(channel, 0.0):
            return self._from_store(channel, block_seconds)
        out: Events = []
        link: Link | None = None
        try:
            with self.links.using() as link:
                if link.reply != channel:
                    out += self._consume(link, channel)
                if not link.replies and not out:  # (no wait at all for 0 seconds)
                    with contextlib.suppress(TimeoutError):
                        link.drain_events(timeout=max(block_seconds, 0.0))
                # Anything else already in comes along without waiting.
                link.drain_ready(READ_COUNT)
        except _Taken:
            return self._from_store(channel, block_seconds)
        except BrokerUnavailable:
            # Events already read (a catch-up, whose position has moved on, or received
            # ones: no_ack) are handed over all the same; the next read reconnects.
            if not out and (link is None or not link.replies):
                raise
        assert link is not None
        return self._handed_over(link, channel, out)

    def _handed_over(self, link: Link, channel: str, out: Events) -> Events:
        """``out`` and the received events that fit one read; the rest wait in the link."""
        budget, size = read_budget(self.store.max_event_bytes), 0
        while link.replies and len(out) < READ_COUNT:
            body = body_of(link.replies[0])
            if out and size + len(body) > budget:
                break
            message = link.replies.popleft()
            if dropped := oversized(message):
                log.warning(
                    "ignored a message of reply queue %s: %s bytes, more than any event a "
                    "client accepts (max_message_bytes, %s); nbtask did not send it",
                    channel,
                    f"{dropped:,}",
                    f"{self.store.max_event_bytes:,}",
                )
                continue
            handed_as = self._next_id()
            if not self._overlap(channel).received(body, handed_as, entry_of(message.headers)):
                continue  # the catch-up read it already
            size += len(body)
            out.append((channel, handed_as, body))
        return out

    def verified(self, channel: str, handed_as: str) -> None:
        """The event handed over as ``handed_as`` verified: the position beside it may count."""
        overlap = self._overlaps.get(channel)
        if overlap is not None:
            overlap.verified(handed_as)

    def _overlap(self, channel: str) -> Overlap:
        return self._overlaps.setdefault(channel, Overlap())

    def _next_id(self) -> str:
        return f"{int(time.time() * 1000)}-{next(self._ids)}"

    def _consume(self, link: Link, channel: str) -> Events:
        """Declare and consume the reply queue; return events missed meanwhile."""
        try:
            link.channel.queue_declare(
                queue=channel, durable=False, exclusive=True, auto_delete=True
            )
        except (ResourceLocked, PreconditionFailed) as exc:
            self.links.drop()  # RabbitMQ closed the channel; the connection is fine
            if channel not in self._taken:
                log.warning(
                    "the reply queue %s is held by another connection or was declared "
                    "otherwise (%s): someone else declared it. Reading this client's "
                    "events from the result store instead, and trying the queue again "
                    "every %.0f s",
                    channel,
                    exc.reply_text,
                    RETRY_SECONDS,
                )
            self._taken[channel] = time.monotonic() + RETRY_SECONDS
            raise _Taken from exc
        self._taken.pop(channel, None)
        queue = kombu.Queue(
            channel,
            exchange="",
            routing_key=channel,
            durable=False,
            exclusive=True,
            auto_delete=True,
            no_declare=True,
        )
        # On py-amqp's connections (nbtask's own), a body too large is never read whole.
        limits: BodyLimits | None = getattr(link.amqp(), "body_limits", None)
        if limits is not None:
            limits.limit(_TAG_PREFIX, self.store.max_event_bytes)
        consumer = kombu.Consumer(
            link.channel,
            queues=[queue],
            no_ack=True,
            on_message=link.replies.append,
            tag_prefix=_TAG_PREFIX,
        )
        consumer.consume()
        link.reply, link.reply_consumer = channel, consumer
        # What was sent before the queue existed (or while it was gone) reached only the
        # store: catch up from there, from where the last catch-up stopped or from just
        # before the newest event received live (with its position; what comes both ways
        # is handed over once: amqp_overlap). Without the store, the next read starts over
        # on a new connection (queue and catch-up both) instead of carrying on with a gap.
        after = self._positions.get(channel, "0-0")
        try:
            after = self._overlap(channel).catch_up_from(
                after, lambda entry: self.store.event_at(channel, entry)
            )
            self._note_trimmed(channel, after)
            missed = self.store.events_after(channel, after)
            end = None if missed else self.store.channel_end(channel)
        except BrokerUnavailable:
            self.links.drop()
            raise
        out = []
        kept = [raw for _, raw in missed if raw]
        for raw, new in zip(kept, self._overlap(channel).caught_up(kept), strict=True):
            if new:  # not received live since the last catch-up
                out.append((channel, self._next_id(), raw))
        if missed:
            self._positions[channel] = missed[-1][0]
        if end is not None:
            self._positions[channel] = end
        return out

    def _from_store(self, channel: str, block_seconds: float) -> Events:
        """Events kept on ``channel``'s stream after the last one read (a second at most)."""
        after = self._positions.get(channel, "0-0")
        self._note_trimmed(channel, after)
        out: Events = []
        for _, entry_id, raw in self.store.read_events({channel: after}, min(block_seconds, 1.0)):
            self._positions[channel] = entry_id
            if raw:
                out.append((channel, self._next_id(), raw))
        return out
