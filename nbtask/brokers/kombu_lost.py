"""Lost deliveries on AMQP: messages RabbitMQ gave back after the child running them died.

A child that receives a message whose task is already ``STARTED`` (and that is marked
redelivered) holds a copy its previous holder lost. It parks the copy in the result
store (``<prefix>:lost`` sorted by when it may be claimed, ``<prefix>:lost:<task id>``
holding the message, its queue, redelivery count and the consumer that held it) and
acknowledges it on AMQP. A supervisor then claims it, like a Redis pending entry of a
dead child, and settles it: ``acks_late`` tasks are put back, early-ack ones reported
``WORKER_LOST``. A task that a live worker still lists as busy (its connection dropped,
not the child) is left alone until it ends; a claim lapses after :data:`CLAIM_LEASE`.
"""

from __future__ import annotations

import contextlib
import json
import time

from nbtask.brokers import Delivery, kombu_scripts
from nbtask.brokers.redis import RedisBroker

__all__ = ["CLAIM_LEASE", "LOST_HOLDER", "LostDeliveries"]

#: The pseudo worker listed by ``dead_workers`` while lost deliveries wait to be settled.
LOST_HOLDER = "nbtask-amqp-redelivered"
#: Seconds after which a claimed but unsettled lost delivery may be claimed again.
CLAIM_LEASE = 30.0
_DELIVERY_PREFIX = "lost:"  # delivery ids of parked deliveries


class LostDeliveries:
    """The parked lost deliveries of one key prefix, in a Redis result store."""

    def __init__(self, store: RedisBroker) -> None:
        self.store = store
        self._key = f"{store.settings.key_prefix}:lost"
        self._park = store.redis.register_script(kombu_scripts.PARK)
        self._claim = store.redis.register_script(kombu_scripts.CLAIM)

    def _entry(self, task_id: str) -> str:
        return f"{self._key}:{task_id}"

    def park(self, task_id: str, raw: bytes, queue: str, deliveries: int) -> None:
        """Keep a lost copy for a supervisor to settle (idempotent)."""
        with self.store.translate_errors():
            self._park(
                keys=[self._key, self._entry(task_id), self.store.record_key(task_id)],
                args=[task_id, raw, queue, deliveries, repr(time.time())],
            )

    def waiting(self) -> int:
        """How many parked deliveries may be claimed now."""
        with self.store.translate_errors():
            return int(self.store.redis.zcount(self._key, "-inf", time.time()))

    def claim(self, holder: str | None) -> list[Delivery]:
        """Claim claimable deliveries: all of them, or those ``holder`` had lost."""
        now = time.time()
        redis = self.store.redis
        with self.store.translate_errors():
            ids = [i.decode() for i in redis.zrangebyscore(self._key, "-inf", now, 0, 100)]
            if not ids:
                return []
            busy = self._busy_tasks()
            entries = {}
            for task_id in ids:
                fields = redis.hgetall(self._entry(task_id))
                if not fields:  # settled meanwhile
                    redis.zrem(self._key, task_id)
                    continue
                if task_id in busy:
                    continue  # a live worker still runs it (its channel closed, not it)
                if holder is not None and fields.get(b"h", b"").decode() != holder:
                    continue
                entries[task_id] = fields
            if not entries:
                return []
            claimed = self._claim(keys=[self._key], args=[repr(now), repr(CLAIM_LEASE), *entries])
        out = []
        for raw_id in claimed:
            task_id = raw_id.decode()
            fields = entries[task_id]
            out.append(Delivery(
                fields.get(b"q", b"").decode(), _DELIVERY_PREFIX + task_id, fields.get(b"e", b""),
                int(fields.get(b"n", b"0") or 0), task_id=task_id,
            ))  # fmt: skip
        return out

    def settle(self, delivery: Delivery) -> bool:
        """Drop a parked delivery once handled; False if ``delivery`` is not a parked one."""
        if not delivery.delivery_id.startswith(_DELIVERY_PREFIX):
            return False
        task_id = delivery.delivery_id[len(_DELIVERY_PREFIX) :]
        with self.store.translate_errors():
            pipe = self.store.redis.pipeline(transaction=True)
            pipe.zrem(self._key, task_id)
            pipe.delete(self._entry(task_id))
            pipe.execute()
        return True

    def _busy_tasks(self) -> set[str]:
        busy: set[str] = set()
        for info in self.store.workers().values():
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                busy.update(str(t) for t in json.loads(info).get("busy", ()) if t)
        return busy
