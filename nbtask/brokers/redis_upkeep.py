"""Redis Streams: the queues' streams and groups, and deliveries whose holder is gone.

The part of :class:`~nbtask.brokers.redis_streams.StreamsTransport` that creates queues
and looks after what dead consumers left: their pending entries (claimed, renewed,
reclaimed once a lease lapsed) and the messages still waiting on a gone process's own
queue (taken to be moved elsewhere).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from redis.client import Pipeline
from redis.exceptions import ResponseError

from nbtask.brokers.handoffs import Delivery
from nbtask.brokers.redis_errors import is_wrong_type
from nbtask.brokers.redis_link import RedisLink
from nbtask.settings import Settings

__all__ = ["GROUP", "StreamsUpkeep"]

log = logging.getLogger("nbtask.brokers.redis_streams")

GROUP = "workers"


class StreamsUpkeep:
    """Queue creation and dead consumers' deliveries, on the streams of ``link``."""

    link: RedisLink
    settings: Settings

    def queue_key(self, queue: str) -> str:
        """The stream holding ``queue``'s messages."""
        return f"{self.settings.key_prefix}:q:{queue}"

    @contextlib.contextmanager
    def _queues_may_be_gone(self, queues: Iterable[str]) -> Iterator[None]:
        # NOGROUP: the server lost the queues (restarted without persistence, or purged).
        # Create them again; what was being done finds nothing this time.
        try:
            yield
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("queues %s were gone from the broker; created them again", list(queues))
            self.ensure_queues(queues)

    def ensure_queues(self, queues: Iterable[str]) -> None:
        """Create each queue's stream and consumer group if missing.

        A key of another type there is replaced (see :meth:`replace_queue`).
        """
        with self.link.translate_errors():
            for queue in queues:
                key = self.queue_key(queue)
                try:
                    self.link.redis.xgroup_create(key, GROUP, id="0", mkstream=True)
                except ResponseError as exc:
                    if is_wrong_type(exc):
                        self.replace_queue(key, exc)
                    elif "BUSYGROUP" not in str(exc):
                        raise

    def replace_queue(self, key: str, why: BaseException) -> None:
        """Make the task queue ``key``, a key of another type, an empty queue again.

        nbtask writes only streams there: someone else put it there, and no task could be
        queued or read there again. Said in one log line.
        """
        if self.link.call("replace_queue", [key], GROUP):
            log.error("replaced %s: not a stream, not written by nbtask (%s)", key, why)

    def held(self, queues: Sequence[str], consumer: str, min_idle: float = 0.0) -> list[Delivery]:
        """Claim and return the deliveries ``consumer`` holds unacknowledged.

        ``min_idle`` (seconds) leaves out entries whose lease was renewed more recently:
        a worker that only looked dead (paused, slow) keeps what it is running.
        """
        out: list[Delivery] = []
        idle = int(min_idle * 1000) or None
        redis = self.link.redis
        with self.link.translate_errors(), self._queues_may_be_gone(queues):
            for queue in queues:
                stream = self.queue_key(queue)
                pending = redis.xpending_range(stream, GROUP, "-", "+", 1000, consumer, idle=idle)
                ids = [p["message_id"] for p in pending]
                if ids:
                    out += self._claim(queue, consumer, ids)
        return out

    def _claim(self, queue: str, consumer: str, ids: list[Any]) -> list[Delivery]:
        stream = self.queue_key(queue)
        claimed = self.link.redis.xclaim(stream, GROUP, consumer, 0, ids)
        out = []
        for entry_id, fields in claimed:
            if fields:  # None when the entry was deleted meanwhile
                out.append(_delivery(queue, entry_id, fields))
            else:
                self.link.redis.xack(stream, GROUP, entry_id)
        return out

    def holds_any(self, queues: Sequence[str], consumers: Sequence[str]) -> bool:
        """True if any of ``consumers`` still holds an unacknowledged delivery."""
        with self.link.translate_errors(), self._queues_may_be_gone(queues):
            for queue in queues:
                summary = self.link.redis.xpending(self.queue_key(queue), GROUP)
                holders = {c["name"].decode() for c in summary.get("consumers", [])}
                if holders & set(consumers):
                    return True
        return False

    def orphans(self, queues: Sequence[str]) -> list[Delivery]:
        """None: a dead holder's entries stay in its pending list (see :meth:`held`)."""
        return []

    def renew(self, consumers: Sequence[str], queues: Sequence[str]) -> None:
        """Reset the idle time of the entries ``consumers`` hold: their lease renewal."""
        redis = self.link.redis
        with self.link.translate_errors(), self._queues_may_be_gone(queues):
            for queue in queues:
                stream = self.queue_key(queue)
                for consumer in consumers:
                    pending = redis.xpending_range(stream, GROUP, "-", "+", 1000, consumer)
                    ids = [p["message_id"] for p in pending]
                    if ids:
                        # Re-claiming to the same consumer resets the entry's idle time:
                        # the lease renewal that keeps long tasks from being reclaimed.
                        redis.xclaim(stream, GROUP, consumer, 0, ids, justid=True)

    def set_aside(self, delivery: Delivery, consumer: str) -> None:
        """Claim ``delivery``'s entry for ``consumer``: its lease starts anew, unrenewed.

        Left with a live process's consumer, it would be renewed at every heartbeat, and
        never be given by :meth:`stale`.
        """
        stream = self.queue_key(delivery.queue)
        with self.link.translate_errors(), self._queues_may_be_gone([delivery.queue]):
            self.link.redis.xclaim(stream, GROUP, consumer, 0, [delivery.delivery_id], justid=True)

    def still_reading(self, consumers: Sequence[str], queues: Sequence[str], within: float) -> bool:
        """True if one of ``consumers`` read one of ``queues`` in the last ``within`` s.

        From the group's consumers (``XINFO CONSUMERS``): on Redis 7.2 and later their
        idle time is since their last read, which an idle process repeats at least once
        a second; before, since their last read that took a message (an idle process's
        reads then tell nothing, and its worker is judged by its heartbeat alone). A
        queue that is gone, or not a stream, tells nothing (it is not made again here).
        """
        names = set(consumers)
        with self.link.translate_errors():
            pipe = self.link.redis.pipeline(transaction=False)
            for queue in queues:
                pipe.xinfo_consumers(self.queue_key(queue), GROUP)
            replies = pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, BaseException):
                continue
            for consumer in reply:
                name = consumer.get("name", b"")
                name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
                if name in names and int(consumer.get("idle", within * 1000)) < within * 1000:
                    return True
        return False

    def forget_consumers(self, consumers: Sequence[str], queues: Sequence[str]) -> None:
        """Delete the (idle) consumers of a worker that stopped."""
        with self.link.translate_errors():
            pipe = self.link.redis.pipeline(transaction=False)
            for queue in queues:
                for consumer in consumers:
                    pipe.xgroup_delconsumer(self.queue_key(queue), GROUP, consumer)
            with contextlib.suppress(ResponseError):
                pipe.execute()

    def stale(self, queues: Sequence[str], consumer: str) -> list[Delivery]:
        """Claim entries nobody renewed for ``visibility_timeout`` (a backstop)."""
        min_idle = int(self.settings.visibility_timeout * 1000)
        out: list[Delivery] = []
        with self.link.translate_errors(), self._queues_may_be_gone(queues):
            for queue in queues:
                cursor = "0-0"
                while True:  # the whole pending list, a hundred entries at a time
                    reply = self.link.redis.xautoclaim(
                        self.queue_key(queue), GROUP, consumer, min_idle, cursor, count=100
                    )
                    out += [_delivery(queue, e, f) for e, f in reply[1] if f]
                    cursor = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
                    if cursor == "0-0":
                        break
        return out

    def take_waiting(self, queue: str, consumer: str, limit: int = 100) -> list[Delivery]:
        """Take up to ``limit`` messages no consumer has read yet, as ``consumer``.

        No start check runs: the caller moves them (:meth:`move`), it does not run them.
        """
        stream = self.queue_key(queue)
        reply = None
        for _ in range(2):  # once more if the group was gone: made again, from the start
            with self.link.translate_errors(), self._queues_may_be_gone([queue]):
                reply = self.link.redis.xreadgroup(GROUP, consumer, {stream: ">"}, count=limit)
                break
        return [_delivery(queue, e, f) for _, entries in reply or [] for e, f in entries if f]

    def drop_queue(self, queue: str) -> bool:
        """Delete ``queue`` if nothing is on it (waiting or taken); True if it is gone."""
        stream = self.queue_key(queue)

        def drop_if_empty(pipe: Pipeline) -> bool:
            if pipe.xlen(stream):
                return False
            pipe.multi()
            pipe.delete(stream)
            return True

        with self.link.translate_errors():
            dropped: bool = self.link.redis.transaction(
                drop_if_empty, stream, value_from_callable=True
            )
        return dropped


def _delivery(
    queue: str, entry_id: bytes | str, fields: Any, verdict: str | None = None
) -> Delivery:
    if isinstance(fields, list):  # raw reply: a flat [k, v, k, v] list
        pairs = iter(fields)  # (paired off one iterator: no two sliced copies, on every task)
        fields = dict(zip(pairs, pairs, strict=False))
    entry = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    task_id = fields.get(b"i")
    try:
        deliveries = int(fields.get(b"n", 0))
    except ValueError:
        deliveries = 0
    return Delivery(
        queue,
        entry,
        fields.get(b"e", b""),
        deliveries,
        verdict,
        task_id.decode(errors="replace") if task_id else None,
    )
