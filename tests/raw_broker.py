"""Direct access to a broker's queues and store, as a test (or an attacker) has it.

Tests that run on both brokers use :func:`raw_broker` to put raw bytes on a task queue,
read a message back, see whether a queue is drained, and read the store that both brokers
share (records, the dead-letter stream, a client's stream of events). The store is the
Redis at ``settings.result_url`` on AMQP and the broker itself on Redis; key names come
from :class:`~nbtask.brokers.redis_store.RedisStore` and the Streams transport, so they
are defined once.
"""

from __future__ import annotations

import abc
import json
import subprocess
import time
from typing import Any

import redis
from helpers import wait_until

from nbtask import Settings
from nbtask.brokers.redis_link import RedisLink
from nbtask.brokers.redis_store import RedisStore
from nbtask.brokers.redis_streams import StreamsTransport
from nbtask.wire.envelope import Signer

__all__ = ["RawBroker", "raw_broker"]


class RawBroker(abc.ABC):
    """The store side, common to both brokers; the queue side is per broker."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        url = settings.result_url or settings.broker_url or ""
        self.keys = RedisStore(RedisLink(url, "broker"), settings)
        self.streams = StreamsTransport(self.keys)
        self.store: redis.Redis = self.keys.link.redis

    def close(self) -> None:
        self.keys.close()

    # Queue side ----------------------------------------------------------------------------
    @abc.abstractmethod
    def inject(
        self,
        raw: bytes,
        *,
        deliveries: int = 0,
        task_id: str | None = None,
        queue: str = "default",
    ) -> None:
        """Put ``raw`` on a task queue, as anyone with broker access could."""

    @abc.abstractmethod
    def inject_lost(self, raw: bytes, task_id: str) -> None:
        """Make ``raw`` look like a dead holder's delivery of ``task_id`` on the default queue.

        As anyone with broker access can: on Redis, taken by a made-up consumer and left
        idle past the visibility timeout (the sweep of expired leases finds it); on
        RabbitMQ, parked as lost under ``task_id``.
        """

    @abc.abstractmethod
    def peek(self, queue: str = "default") -> bytes:
        """The one message waiting on ``queue``, left there."""

    def waiting(self, queue: str = "default") -> bool:
        """Whether one message waits on ``queue`` (looked at, left there)."""
        try:
            self.peek(queue)
        except (AssertionError, ValueError):
            return False
        return True

    def captured(self, queue: str = "default") -> bytes:
        """The one message waiting on ``queue``, once it is there, as an outsider copies it."""
        wait_until(lambda: self.waiting(queue), 10, "the message on its queue")
        return self.peek(queue)

    def drained(self, queue: str = "default") -> bool:
        """Nothing waiting on ``queue`` and nothing taken but unacknowledged."""
        return not any(self.leftover(queue).values())

    @abc.abstractmethod
    def queued(self, queue: str = "default") -> int:
        """How many messages ``queue`` holds (on RabbitMQ, those not taken by a worker)."""

    @abc.abstractmethod
    def queue_exists(self, queue: str) -> bool:
        """Whether the broker still has ``queue`` (a stream, or an AMQP queue)."""

    @abc.abstractmethod
    def leftover(self, queue: str = "default") -> dict[str, int]:
        """What keeps ``queue`` from being drained, counted by kind (all 0 when drained)."""

    @abc.abstractmethod
    def push_event(self, channel: str, raw: bytes) -> None:
        """Put ``raw`` on a client's event channel, where its listener reads."""

    def wait_for_channel(self, channel: str) -> None:
        """Wait until a client's listener reads ``channel`` (a stream needs no waiting)."""
        del channel  # a stream takes events before its reader starts

    # Store side ----------------------------------------------------------------------------
    def record(self, task_id: str) -> dict[bytes, bytes]:
        fields: dict[bytes, bytes] = self.store.hgetall(self.keys.record_key(task_id))
        return fields

    def dead_letters(self) -> list[dict[bytes, bytes]]:
        """The dead-letter stream's entries' fields, oldest first."""
        return [fields for _, fields in self.store.xrange(self.keys.dead_letter_key)]

    def forge_dead_process(self, consumer: str) -> None:
        """A dead worker's registry entry naming the process ``consumer``: a live worker
        then moves what waits on that process's own queue elsewhere."""
        entry = {
            "hostname": "elsewhere",
            "pid": 4242,
            "queues": ["default"],
            "concurrency": 1,
            "consumers": [consumer],
            "seen": time.time() - 60,
        }
        registry = f"{self.settings.key_prefix}:workers"
        self.store.hset(registry, f"dead-{consumer}", json.dumps(entry))

    def stored_event_types(self, signer: Signer, channel: str, task_id: str) -> list[str]:
        """Types of the events about ``task_id`` kept on ``channel``'s stream, in order."""
        out = []
        for _, fields in self.store.xrange(channel):
            raw = fields.get(b"e", b"")
            if raw:
                header = signer.open(raw).header
                if header["id"] == task_id:
                    out.append(str(header["type"]))
        return out


class _RedisQueues(RawBroker):
    def _stream(self, queue: str = "default") -> str:
        return self.streams.queue_key(queue)

    def inject(
        self,
        raw: bytes,
        *,
        deliveries: int = 0,
        task_id: str | None = None,
        queue: str = "default",
    ) -> None:
        fields: dict[str, Any] = {"e": raw, "n": deliveries}
        if task_id is not None:
            fields["i"] = task_id
        self.store.xadd(self._stream(queue), fields)

    def inject_lost(self, raw: bytes, task_id: str) -> None:
        stream = self._stream()
        taking = self.store.pipeline(transaction=True)  # no worker's child takes it first
        taking.xadd(stream, {"e": raw, "n": 0, "i": task_id})
        taking.xreadgroup("workers", "ghost-0", {stream: ">"}, count=1)
        entry_id, _ = taking.execute()
        self.store.xclaim(stream, "workers", "ghost-0", 0, [entry_id], idle=60_000)

    def peek(self, queue: str = "default") -> bytes:
        [(_, fields)] = self.store.xrange(self._stream(queue))
        raw: bytes = fields[b"e"]
        return raw

    def queued(self, queue: str = "default") -> int:
        return int(self.store.xlen(self._stream(queue)))

    def queue_exists(self, queue: str) -> bool:
        return bool(self.store.exists(self._stream(queue)))

    def leftover(self, queue: str = "default") -> dict[str, int]:
        stream = self._stream(queue)
        try:
            pending = int(self.store.xpending(stream, "workers")["pending"])
        except redis.ResponseError:  # no worker ever read it: nothing can be pending
            pending = 0
        return {"queued": self.queued(queue), "pending": pending}

    def push_event(self, channel: str, raw: bytes) -> None:
        self.store.xadd(channel, {"e": raw})


class _AmqpQueues(RawBroker):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        import kombu

        self.connection = kombu.Connection(settings.broker_url, connect_timeout=5)
        self.channel = self.connection.channel()

    def close(self) -> None:
        self.connection.release()
        super().close()

    def _queue(self, queue: str = "default") -> str:
        return f"{self.settings.key_prefix}:q:{queue}"

    def _publish(self, routing_key: str, raw: bytes, headers: dict[str, Any]) -> None:
        message = self.channel.prepare_message(
            raw,
            headers=headers,
            content_type="application/octet-stream",
            content_encoding="binary",
        )
        self.channel.basic_publish(message, exchange="", routing_key=routing_key)

    def inject(
        self,
        raw: bytes,
        *,
        deliveries: int = 0,
        task_id: str | None = None,
        queue: str = "default",
    ) -> None:
        name = self._queue(queue)
        self.channel.queue_declare(queue=name, durable=True, auto_delete=False)
        headers: dict[str, Any] = {"nbtask-deliveries": deliveries}
        if task_id is not None:
            headers["nbtask-id"] = task_id
        self._publish(name, raw, headers)

    def inject_lost(self, raw: bytes, task_id: str) -> None:
        lost = f"{self.settings.key_prefix}:lost"
        fields = {"e": raw, "q": "default", "n": 0, "h": "ghost-0", "p": "1"}
        self.store.hset(f"{lost}:{task_id}", mapping=fields)
        self.store.zadd(lost, {task_id: time.time()})

    def peek(self, queue: str = "default") -> bytes:
        message = self.channel.basic_get(self._queue(queue), no_ack=False)
        assert message is not None, "no message waiting on the queue"
        raw = bytes(message.body)
        self.channel.basic_reject(message.delivery_info["delivery_tag"], requeue=True)
        return raw

    def queued(self, queue: str = "default") -> int:
        _, waiting, _ = self.channel.queue_declare(queue=self._queue(queue), passive=True)
        return int(waiting)

    def queue_exists(self, queue: str) -> bool:
        return self._exists(self._queue(queue))

    def leftover(self, queue: str = "default") -> dict[str, int]:
        ready, unacked = _rabbitmq_counts(self._queue(queue))
        lost = int(self.store.zcard(f"{self.settings.key_prefix}:lost"))
        return {"ready": ready, "unacknowledged": unacked, "parked lost": lost}

    def push_event(self, channel: str, raw: bytes) -> None:
        self.wait_for_channel(channel)
        self._publish(channel, raw, {})

    def wait_for_channel(self, channel: str) -> None:
        # The client's listener declares its reply queue when it starts reading; a
        # message for a queue that does not exist yet would be dropped.
        deadline = time.monotonic() + 10
        while not self._exists(channel):
            assert time.monotonic() < deadline, f"the reply queue {channel} never appeared"
            time.sleep(0.05)

    def _exists(self, name: str) -> bool:
        from amqp.exceptions import NotFound, ResourceLocked

        try:
            self.channel.queue_declare(queue=name, passive=True)
        except (NotFound, ResourceLocked) as exc:
            self.channel = self.connection.channel()  # a failed check closes the channel
            return isinstance(exc, ResourceLocked)  # exclusive to its client: it exists
        return True


def _rabbitmq_counts(name: str) -> tuple[int, int]:
    """``(ready, unacknowledged)`` messages of a queue, from ``rabbitmqctl``.

    AMQP itself reports only ready messages; the unacknowledged ones show here.
    """
    try:
        out = subprocess.run(
            [
                "rabbitmqctl",
                "list_queues",
                "-q",
                "--no-table-headers",
                "name",
                "messages_ready",
                "messages_unacknowledged",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise AssertionError(
            f"cannot count the queue's messages with rabbitmqctl ({exc}); run the tests as a "
            "user allowed to run rabbitmqctl (root here)"
        ) from exc
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == name:
            return int(parts[1]), int(parts[2])
    return 0, 0  # never declared: nothing in it


def raw_broker(settings: Settings) -> RawBroker:
    """Raw access for the broker ``settings`` name."""
    url = settings.broker_url or ""
    return _AmqpQueues(settings) if url.startswith("amqp") else _RedisQueues(settings)
