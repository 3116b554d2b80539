"""Messages kept off their queues on Redis: those waiting for their ETA, those given up on.

Keys, under ``<key_prefix>:``: ``eta:<queue>``, the messages of ``queue`` not due yet (a
sorted set of ``"<task id>:<message>"`` members by due time), and ``dead``, the messages
given up on (a stream; an ETA member without a task id is moved there too). What is parked
for a gone process's own queue is parked again for another (:meth:`RedisParked.repark`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from nbtask.brokers.handoffs import Delivery, Parked
from nbtask.brokers.redis_channels import CHANNEL_MAXLEN, RedisChannels

__all__ = ["DEAD_LETTER_BYTES", "RedisParked", "log_set_aside"]

# The store's log lines, whichever of its modules writes them.
log = logging.getLogger("nbtask.brokers.redis_store")

#: The bytes of a message kept in the dead-letter stream (more: its start, size and hash).
DEAD_LETTER_BYTES = 1 << 20


class RedisParked(RedisChannels):
    """The ETA sets and dead letters of :class:`~nbtask.brokers.redis_store.RedisStore`.

    Built on its channels: the dead-letter stream is appended to as a channel is.
    """

    # Keys ----------------------------------------------------------------------------------
    def eta_key(self, queue: str) -> str:
        """The sorted set holding ``queue``'s messages that are not due yet."""
        return f"{self.prefix}:eta:{queue}"

    @property
    def dead_letter_key(self) -> str:
        """The stream of messages given up on."""
        return f"{self.prefix}:dead"

    # ETA -------------------------------------------------------------------------------------
    def claim_due(
        self, queues: Sequence[str], moving_key: Callable[[str], str], stuck_after: float
    ) -> tuple[float | None, list[tuple[str, bytes]]]:
        """Claim due ETA messages of ``queues`` into their ``moving_key(queue)`` sets.

        Returns the next due time and ``(queue, member)`` pairs to publish; a member
        claimed ``stuck_after`` seconds ago and still there is claimed again.
        """
        keys = [self.dead_letter_key]
        for queue in queues:
            keys += [self.eta_key(queue), moving_key(queue)]
        now = time.time()
        reply = self.link.call(
            "claim_due", keys, repr(now), repr(now - stuck_after), CHANNEL_MAXLEN
        )
        nxt, moved = self.due_reply(reply[:3]), reply[3:]
        return nxt, [
            (queues[int(index) - 1], bytes(member))
            for index, member in zip(moved[::2], moved[1::2], strict=True)
        ]

    def due_reply(self, reply: Sequence[Any]) -> float | None:
        """The next due time from an ETA script's ``{next, quarantined, set aside}``.

        Logs what was quarantined or set aside.
        """
        for key in reply[2]:
            log_set_aside(key.decode("utf-8", "replace"), "an ETA set")
        if int(reply[1]):
            log.error(
                "moved %d ETA entr%s without a task id to the dead-letter stream %s "
                "(not written by nbtask)",
                int(reply[1]),
                "y" if int(reply[1]) == 1 else "ies",
                self.dead_letter_key,
            )
        return float(reply[0]) if reply[0] else None

    def drop_moved(self, members: Sequence[tuple[str, bytes]]) -> None:
        """Forget ``(moving set, member)`` pairs once their messages are published."""
        with self.link.translate_errors():
            pipe = self.link.redis.pipeline(transaction=False)
            for key, member in members:
                pipe.zrem(key, member)
            pipe.execute()

    def take_waiting(self, queues: Sequence[str]) -> list[str]:
        """Delete the ETA messages of ``queues``; the task ids they named."""
        with self.link.translate_errors():
            pipe = self.link.redis.pipeline(transaction=True)
            for queue in queues:
                pipe.zrange(self.eta_key(queue), 0, -1)
                pipe.delete(self.eta_key(queue))
            replies = pipe.execute(raise_on_error=False)
        return [
            bytes(member).partition(b":")[0].decode("utf-8", "replace")
            for members in replies[::2]
            if isinstance(members, list)  # else another type, holding no messages
            for member in members
        ]

    def parked(self, queue: str, keys: Sequence[str], limit: int) -> list[Parked]:
        """Up to ``limit`` messages parked for ``queue`` in ``keys``, soonest first, left there.

        The sorted sets ``keys`` are read in turn; a key of another type is set aside.
        """
        reply = self.link.call("parked", keys, limit)
        for key in reply[0]:
            log_set_aside(key.decode("utf-8", "replace"), "an ETA set")
        found = reply[1:]
        return [
            Parked(queue, keys[int(index) - 1], bytes(member), float(due))
            for index, member, due in zip(found[::3], found[1::3], found[2::3], strict=True)
        ]

    def repark(self, parked: Parked, queue: str, raw: bytes, task_id: str, record: str) -> bool:
        """Park ``raw`` for ``queue``, due as ``parked`` was, and drop ``parked``, at once.

        The task's ``record`` (its key) names ``queue`` (see ``note_moved``). False, with
        nothing done, if ``parked`` is gone.
        """
        keys = [parked.where, self.eta_key(queue), record]
        member = task_id.encode() + b":" + raw
        due = repr(parked.due)
        return bool(self.link.call("repark", keys, parked.member, due, member, queue, large=True))

    def dead_letter_parked(self, parked: Parked) -> bool:
        """Keep ``parked`` in the dead-letter stream and drop it, at once; False if gone."""
        add = self.dead_letter_command(Delivery(parked.queue, "", parked.raw))
        keys = [parked.where, self.dead_letter_key]
        kept = int(self.link.call("dead_letter_parked", keys, parked.member, *add[2:], large=True))
        if kept == 2:
            log.error("replaced %s, which nbtask did not write: Redis refused an entry", keys[1])
        return kept > 0

    # Dead letters ----------------------------------------------------------------------------
    def dead_letter_command(self, delivery: Delivery) -> tuple[Any, ...]:
        """The command keeping a message given up on in the dead-letter stream.

        A message over :data:`DEAD_LETTER_BYTES` keeps only its start, with its size and
        SHA-256: whoever may publish to RabbitMQ, but not write to the store, must not
        fill the store with copies of huge messages nbtask refused.
        """
        raw = delivery.raw
        whole = len(raw) <= DEAD_LETTER_BYTES
        extra = () if whole else ("size", len(raw), "sha256", hashlib.sha256(raw).hexdigest())
        kept = raw if whole else bytes(memoryview(raw)[:DEAD_LETTER_BYTES])
        return (
            "XADD",
            self.dead_letter_key,
            "MAXLEN",
            "~",
            CHANNEL_MAXLEN,
            "*",
            "e",
            kept,
            "q",
            delivery.queue,
            "n",
            delivery.deliveries,
            *extra,
        )

    def dead_letter(self, delivery: Delivery) -> None:
        """Keep a message given up on in the dead-letter stream."""
        command = self.dead_letter_command(delivery)
        self.append_replacing(self.dead_letter_key, [command], large=True)


def log_set_aside(key: str, what: str) -> None:
    """Log that ``key``, of another type than a sorted set (``what``), was deleted."""
    log.error(
        "set aside %s: a key of another Redis type than %s (a sorted set), not written by "
        "nbtask; deleted",
        key,
        what,
    )
