"""Redis Streams: deliveries taken off their queue other than by finishing, and due ETAs.

The part of :class:`~nbtask.brokers.redis_streams.StreamsTransport` that drops a delivery,
puts it back (requeued, or moved to another queue), or dead-letters it, each in one
transaction with the acknowledgement of its entry; that moves due ETA messages from the
store to their streams; and that parks again for another queue what is parked for a gone
process's own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from redis.exceptions import ResponseError

from nbtask.brokers.handoffs import Delivery, Parked
from nbtask.brokers.redis_channels import CHANNEL_MAXLEN, refuses_entries
from nbtask.brokers.redis_errors import is_wrong_type
from nbtask.brokers.redis_link import Command
from nbtask.brokers.redis_store import RedisStore
from nbtask.brokers.redis_upkeep import GROUP, StreamsUpkeep

__all__ = ["StreamsMoves"]

log = logging.getLogger("nbtask.brokers.redis_streams")

#: A task queue's entry id this far past the clock was not given by Redis (see
#: ``repair_queue``): clocks of hosts differ by far less.
_AHEAD_SECONDS = 86_400.0


class StreamsMoves(StreamsUpkeep):
    """Dropping, requeueing, moving and dead-lettering deliveries; moving due ETAs."""

    _store: RedisStore

    @property
    def store(self) -> RedisStore:
        """The Redis store on the same server."""
        return self._store

    def discard(self, delivery: Delivery) -> None:
        """Acknowledge and delete a delivery that must not run."""
        with self.link.translate_errors():
            self.link.run(self._dropped(delivery))

    def requeue(self, delivery: Delivery, task_id: str) -> None:
        """Re-add the message with its redelivery count raised, and drop the old entry."""
        stream = self.queue_key(delivery.queue)
        add = ("XADD", stream, "*", "e", delivery.raw, "n", delivery.deliveries + 1, "i", task_id)
        pending = ("HSET", self.store.record_key(task_id), "state", "PENDING")
        (added, *_) = self._replace(delivery, add, pending)
        self._add_again(delivery, add, added)

    def move(self, delivery: Delivery, queue: str, raw: bytes, task_id: str) -> None:
        """Put ``raw`` (the delivery's message, sealed for ``queue``) there; drop the old."""
        target = self.queue_key(queue)
        add = ("XADD", target, "*", "e", raw, "n", delivery.deliveries, "i", task_id)
        (added, *_) = self._replace(delivery, add)
        self._add_again(delivery, add, added)

    def _add_again(self, delivery: Delivery, add: Command, reply: Any) -> None:
        """Add a message whose ``add`` to a task queue the transaction's run refused.

        Its delivery is dropped by then. A queue whose ids were used up by an entry past
        the clock, or whose key is of another type (nbtask wrote neither), is repaired or
        replaced first (see the ``repair_queue`` and ``replace_queue`` scripts); a queue
        still refusing keeps it in the dead-letter stream.
        """
        if not isinstance(reply, ResponseError):
            return
        queue = str(add[1])
        with self.link.translate_errors():
            if is_wrong_type(reply) or "last possible" in str(reply):
                self._repair(queue, reply)
                try:
                    self.link.run([add], large=True)
                    return
                except ResponseError as exc:
                    reply = exc
            log.error("kept a message %s refused in the dead-letter stream: %s", queue, reply)
            command = self.store.dead_letter_command(delivery)
            self.store.append_replacing(self.store.dead_letter_key, [command], large=True)

    def _repair(self, queue: str, refused: ResponseError) -> None:
        """Make ``queue`` take entries again after Redis ``refused`` one.

        A key of another type is replaced; a stream whose ids were used up has its entries
        past the clock deleted.
        """
        if is_wrong_type(refused):
            self.replace_queue(queue, refused)
            return
        ahead = str(int((time.time() + _AHEAD_SECONDS) * 1000))
        deleted = self.link.call("repair_queue", [queue], ahead)
        log.error("deleted %s entries past the clock from %s (%s)", deleted, queue, refused)

    def dead_letter(self, delivery: Delivery) -> None:
        """Move the message to the dead-letter stream and acknowledge it."""
        command = self.store.dead_letter_command(delivery)
        (kept, *_) = self._replace(delivery, command)
        if isinstance(kept, ResponseError) and refuses_entries(kept):
            # Refused as the transaction ran (the entry is dropped): kept once replaced.
            self.store.append_replacing(self.store.dead_letter_key, [command], large=True)

    def _replace(self, delivery: Delivery, *commands: Command) -> list[Any]:
        """Run ``commands`` and drop ``delivery``'s entry in one transaction; their replies.

        Together or not at all, so the message is never lost between the two steps, nor
        left in two places. A command Redis refuses as it runs them is not raised: its
        reply is the error.
        """
        transaction = [("MULTI",), *commands, *self._dropped(delivery), ("EXEC",)]
        with self.link.translate_errors():
            replies = self.link.run(transaction, large=True)
        return list(replies[-1] or ())

    def _dropped(self, delivery: Delivery) -> list[Command]:
        """The commands acknowledging a delivery and deleting its entry from its stream."""
        stream = self.queue_key(delivery.queue)
        return [
            ("XACK", stream, GROUP, delivery.delivery_id),
            ("XDEL", stream, delivery.delivery_id),
        ]

    def move_due(self, queues: Sequence[str]) -> float | None:
        """Move due ETA messages to their streams; return the next due time."""
        keys = [self.store.dead_letter_key]
        for queue in queues:
            keys += [self.store.eta_key(queue), self.queue_key(queue)]
        reply = self.link.call("move_due", keys, repr(time.time()), CHANNEL_MAXLEN)
        return self.store.due_reply(reply)

    def parked(self, queue: str, limit: int = 100) -> list[Parked]:
        """Up to ``limit`` messages of ``queue``'s ETA set, soonest first, left there."""
        return self.store.parked(queue, [self.store.eta_key(queue)], limit)

    def repark(self, parked: Parked, queue: str, raw: bytes, task_id: str) -> bool:
        """Park ``raw`` for ``queue``, due as ``parked`` was (see ``Transport.repark``)."""
        return self.store.repark(parked, queue, raw, task_id, self.store.record_key(task_id))

    def dead_letter_parked(self, parked: Parked) -> bool:
        """Keep ``parked`` in the dead-letter stream and drop it; False if it was gone."""
        return self.store.dead_letter_parked(parked)
