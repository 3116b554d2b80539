"""Lost deliveries on AMQP: messages RabbitMQ gave back after the child running them died.

A child that receives a message whose task is already ``STARTED`` (and that is marked
redelivered) holds a copy its previous holder lost. It parks the copy in the store
(``<prefix>:lost`` sorted by when it may be claimed, ``<prefix>:lost:<task id>`` holding
the message, its queue, redelivery count and the consumer that held it) and acknowledges
it on AMQP. A supervisor serving its queue then claims it, like a Redis pending entry of
a dead child, and settles it: ``acks_late`` tasks are put back, early-ack ones reported
``WORKER_LOST``. A task that a live worker still lists as busy (its connection dropped,
not the child) is left alone until it ends. A claim lapses for others after
:data:`CLAIM_LEASE`; the supervisor that made it may take it again at once, so one whose
connection dropped between claiming and settling settles it as soon as it is back.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence

from nbtask.brokers.bounded_reads import read_bounded
from nbtask.brokers.handoffs import Delivery
from nbtask.brokers.redis_store import RedisStore
from nbtask.wire.records import MAX_PLAIN_BYTES

__all__ = ["CLAIM_LEASE", "LostDeliveries"]

#: Seconds after which a claimed but unsettled lost delivery may be claimed again.
CLAIM_LEASE = 30.0
_DELIVERY_PREFIX = "lost:"  # delivery ids of parked deliveries
# A parked entry's fields: message, queue, deliveries, holder (consumer, pid), claimant.
_PARKED_FIELDS = ("e", "q", "n", "h", "p", "c")

log = logging.getLogger(__name__)


class LostDeliveries:
    """The parked lost deliveries of one key prefix, in the Redis store."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self._key = f"{store.prefix}:lost"
        self._claimant = uuid.uuid4().hex  # who made a claim, in the parked entry
        self._claimed: set[str] = set()  # claimed here and not settled yet
        # Those last said left unclaimed for an unreadable live registry entry: said again
        # only when they change, not at every claim while the entry is there.
        self._left_unclaimed: set[str] = set()

    def _entry(self, task_id: str) -> str:
        return f"{self._key}:{task_id}"

    def park(self, task_id: str, raw: bytes, queue: str, deliveries: int) -> None:
        """Keep a lost copy for a supervisor to settle (idempotent)."""
        keys = [self._key, self._entry(task_id), self.store.record_key(task_id)]
        self.store.link.call(
            "park_lost", keys, task_id, raw, queue, deliveries, repr(time.time()), large=True
        )

    def waiting(self) -> int:
        """How many parked deliveries may be claimed now (by this instance)."""
        with self.store.link.translate_errors():
            due = int(self.store.link.redis.zcount(self._key, "-inf", time.time()))
        return due + len(self._claimed)

    def claim(self, holder: str | None, queues: Sequence[str]) -> list[Delivery]:
        """Claim claimable deliveries of ``queues``: all of them, or those ``holder`` lost."""
        now = time.time()
        redis = self.store.link.redis
        with self.store.link.translate_errors():
            due = redis.zrangebyscore(self._key, "-inf", now, 0, 100)
            due_ids = [i.decode("utf-8", "replace") for i in due]
            ids = list(dict.fromkeys([*due_ids, *self._claimed]))
            if not ids:
                return []
            known = self.store.workers_if_known()
            if known is None:
                # A live worker's entry cannot be read (nbtask did not write it): what it
                # runs is unknown, and a copy made to look lost may be of its running task.
                left, self._left_unclaimed = self._left_unclaimed, set(ids)
                if self._left_unclaimed != left:
                    log.warning(
                        "%d lost delivery(ies) left unclaimed: a live worker's registry entry "
                        "cannot be read (nbtask did not write it); looked at again at later "
                        "sweeps, said again if they change",
                        len(ids),
                    )
                return []
            self._left_unclaimed = set()
            live = known.values()
            busy = {task for info in live for task in info.busy}
            # Holders still alive, as their supervisors last saw them: (consumer, pid).
            alive = {
                (c, str(p))
                for info in live
                for c, p in zip(info.consumers, info.pids, strict=False)  # pids: may be none
            }
            entries = {}
            for task_id in ids:
                fields = self._parked(task_id)
                if not fields:  # settled meanwhile
                    redis.zrem(self._key, task_id)
                    self._claimed.discard(task_id)
                    continue
                held_by = (fields.get(b"h", b"").decode(), fields.get(b"p", b"").decode())
                running = task_id in busy or (holder is None and held_by in alive)
                if running and not self._ended(task_id):
                    # A live child still runs it (its channel closed, not the child): it
                    # ends by itself, or its supervisor settles it when the child dies.
                    continue
                if holder is not None and fields.get(b"h", b"").decode() != holder:
                    continue
                if fields.get(b"q", b"").decode("utf-8", "replace") not in queues:
                    continue
                entries[task_id] = fields
        if not entries:
            return []
        claimed = self.store.link.call(
            "claim_lost", [self._key], repr(now), repr(CLAIM_LEASE), self._claimant, *entries
        )
        out = []
        for raw_id in claimed:
            task_id = raw_id.decode()
            self._claimed.add(task_id)
            fields = entries[task_id]
            try:
                deliveries = int(fields.get(b"n", b"0") or 0)
            except ValueError:
                deliveries = 0
            out.append(
                Delivery(
                    fields.get(b"q", b"").decode("utf-8", "replace"),
                    _DELIVERY_PREFIX + task_id,
                    fields.get(b"e", b""),
                    deliveries,
                    task_id=task_id,
                )
            )
        return out

    def _parked(self, task_id: str) -> dict[bytes, bytes]:
        """A parked entry's fields, each read only up to the size nbtask writes it at."""
        bounds = dict.fromkeys(_PARKED_FIELDS, MAX_PLAIN_BYTES)
        bounds["e"] = self.store.max_event_bytes  # the message (a larger one is refused)
        fields, over = read_bounded(self.store.link, self._entry(task_id), bounds)
        if over:
            log.warning(
                "the lost delivery %s holds %s larger than nbtask writes: not read",
                self._entry(task_id),
                ", ".join(over),
            )
        return fields

    def _ended(self, task_id: str) -> bool:
        record = self.store.get_record(task_id)
        return record is not None and record.final

    def settle(self, delivery: Delivery) -> bool:
        """Drop a parked delivery once handled; False if ``delivery`` is not a parked one."""
        if not delivery.delivery_id.startswith(_DELIVERY_PREFIX):
            return False
        task_id = delivery.delivery_id[len(_DELIVERY_PREFIX) :]
        with self.store.link.translate_errors():
            pipe = self.store.link.redis.pipeline(transaction=True)
            pipe.zrem(self._key, task_id)
            pipe.delete(self._entry(task_id))
            pipe.execute()
        self._claimed.discard(task_id)
        return True
