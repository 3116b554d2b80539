"""AMQP: what a gone worker process left, for the supervisor's housekeeping.

The part of :class:`~nbtask.brokers.amqp.AmqpTransport` that looks after dead consumers'
deliveries (RabbitMQ gives them back by itself; only the ones parked as lost are left to
settle) and the messages still waiting on a gone process's own queue (taken, to be moved
elsewhere, then the queue dropped), or parked for it in the store until their due time
(parked again for another queue).
"""

from __future__ import annotations

from collections.abc import Sequence

from nbtask.brokers.amqp_guards import body_of, read_headers
from nbtask.brokers.amqp_links import Links
from nbtask.brokers.amqp_lost import LostDeliveries
from nbtask.brokers.handoffs import Delivery, Parked
from nbtask.brokers.redis_store import RedisStore

__all__ = ["AmqpUpkeep"]


class AmqpUpkeep:
    """Dead consumers' deliveries and gone processes' queues, on ``links``."""

    links: Links
    lost: LostDeliveries
    _prefix: str
    _store: RedisStore

    def queue_name(self, queue: str) -> str:
        """The AMQP queue holding ``queue``'s messages."""
        return f"{self._prefix}:q:{queue}"

    def _moving_key(self, queue: str) -> str:
        """The store's set of ``queue``'s due ETA messages claimed to be published."""
        return f"{self._prefix}:eta-moving:{queue}"

    def take_waiting(self, queue: str, consumer: str, limit: int = 100) -> list[Delivery]:
        """Take up to ``limit`` waiting messages, unacknowledged, to move them."""
        out: list[Delivery] = []
        with self.links.using() as link:
            for message in self.links.queues.waiting(link, self.queue_name(queue), ack=False):
                task_id, deliveries = read_headers(message.headers)
                delivery_id = f"{link.generation}:{message.delivery_tag}"
                link.held[delivery_id] = message
                raw = body_of(message)
                out.append(Delivery(queue, delivery_id, raw, deliveries, task_id=task_id))
                if len(out) == limit:
                    break
        return out

    def drop_queue(self, queue: str) -> bool:
        """Delete ``queue`` if nothing is on it and nobody consumes it; True if it is gone."""
        with self.links.using() as link:
            return self.links.queues.drop_if_idle(link, self.queue_name(queue))

    def parked(self, queue: str, limit: int = 100) -> list[Parked]:
        """Up to ``limit`` messages parked for ``queue``, soonest first, left there.

        Those of its ETA set, then those claimed to be published that were not dropped
        once published (whoever claimed them died first: published again, as a stuck
        claim is).
        """
        keys = [self._store.eta_key(queue), self._moving_key(queue)]
        return self._store.parked(queue, keys, limit)

    def repark(self, parked: Parked, queue: str, raw: bytes, task_id: str) -> bool:
        """Park ``raw`` for ``queue``, due as ``parked`` was (see ``Transport.repark``)."""
        return self._store.repark(parked, queue, raw, task_id, self._store.record_key(task_id))

    def dead_letter_parked(self, parked: Parked) -> bool:
        """Keep ``parked`` in the dead-letter stream and drop it; False if it was gone."""
        return self._store.dead_letter_parked(parked)

    def held(self, queues: Sequence[str], consumer: str, min_idle: float = 0.0) -> list[Delivery]:
        """Parked deliveries that ``consumer`` had lost (``min_idle`` does not apply).

        AMQP itself gives a dead consumer's deliveries back; only the ones already parked
        by whoever received them again are returned.
        """
        return self.lost.claim(consumer, queues)

    def holds_any(self, queues: Sequence[str], consumers: Sequence[str]) -> bool:
        """False: AMQP gives a dead consumer's deliveries back by itself."""
        return False

    def orphans(self, queues: Sequence[str]) -> list[Delivery]:
        """Parked lost deliveries of ``queues``, whoever lost them, that may be settled now.

        Only a worker serving a queue settles its lost deliveries: it can verify them (a
        worker of another app, with another secret, on the same key prefix could not).
        """
        return self.lost.claim(None, queues) if self.lost.waiting() else []

    def stale(self, queues: Sequence[str], consumer: str) -> list[Delivery]:
        """None: AMQP has no leases (a dead holder's connection closes)."""
        return []

    def renew(self, consumers: Sequence[str], queues: Sequence[str]) -> None:
        """Nothing to renew: AMQP keeps a delivery as long as its connection lives."""

    def set_aside(self, delivery: Delivery, consumer: str) -> None:
        """Nothing to move: a parked lost delivery left unsettled is claimed anew.

        By the supervisor that claimed it, at its next sweeps (see :meth:`orphans`).
        """

    def still_reading(self, consumers: Sequence[str], queues: Sequence[str], within: float) -> bool:
        """False: RabbitMQ cannot tell (see ``Transport.still_reading``).

        A consumer it lists may be a dead process's connection that a fork of it holds
        open; what waits on that process's own queue must still be moved. A consumed
        queue is not deleted either way (``queue.delete`` with ``if-unused``), and the
        worker's entry stays while it is.
        """
        return False

    def forget_consumers(self, consumers: Sequence[str], queues: Sequence[str]) -> None:
        """Nothing to forget: a consumer ends with its connection."""
