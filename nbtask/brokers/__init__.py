"""Brokers: where task messages wait, where events travel, and where results are kept.

:class:`Broker` is the seam between the app/worker and a transport. A transport module
imports nothing above ``envelope``/``settings``/``errors``: it moves signed bytes and
never looks inside a body.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from nbtask.settings import Settings

__all__ = ["KOMBU_SCHEMES", "Broker", "Delivery", "Publish", "open_broker"]


@dataclasses.dataclass(frozen=True)
class Delivery:
    """A message handed to a worker and not yet acknowledged.

    ``deliveries`` counts earlier deliveries that ended with the worker dead. ``verdict``
    is set when the broker already decided whether the task may start: ``"OK"`` (it is
    now STARTED) or the state that forbids it; ``None`` means "ask ``start()``".
    """

    queue: str
    delivery_id: str
    raw: bytes
    deliveries: int = 0
    verdict: str | None = None
    #: The task id as the broker saw it (unverified; checked against the signed header).
    task_id: str | None = None


@dataclasses.dataclass(frozen=True)
class Publish:
    """One message to enqueue: ``raw`` for ``queue``, due at ``eta`` (epoch seconds) if set."""

    queue: str
    task_id: str
    raw: bytes
    record: Mapping[str, str]
    eta: float | None = None


class Broker(Protocol):
    """What the app and the worker need from a transport."""

    def ping(self) -> None:
        """Raise :class:`~nbtask.errors.BrokerUnavailable` unless the broker answers."""

    def close(self) -> None:
        """Release connections."""

    # Client side -------------------------------------------------------------------------
    def channel_key(self, client_id: str) -> str:
        """The name of a client's event channel."""

    def publish(self, messages: Sequence[Publish]) -> None:
        """Enqueue messages (and their PENDING records) in one round trip."""

    def read_events(
        self, channels: Mapping[str, str], block_seconds: float
    ) -> list[tuple[str, str, bytes]]:
        """Wait for events on ``{channel: last_id}``; return ``(channel, id, raw)`` triples."""

    def channel_end(self, channel: str) -> str:
        """The id of the newest event on a channel (``"0-0"`` when empty)."""

    def replay(self, channel: str) -> list[bytes]:
        """Every event still kept on a client's channel, oldest first."""

    def wake(self, channel: str) -> None:
        """Make a reader blocked on ``channel`` return at once."""

    def keep_channel(self, channel: str) -> None:
        """Extend the life of a client's event channel (the client is alive)."""

    def recent_tasks(self, group: str, channel: str, limit: int) -> list[tuple[str, str, float]]:
        """Note ``channel`` as a client of ``group``; its clients' newest ``(id, channel, at)``."""

    def get_record(self, task_id: str) -> dict[str, bytes]:
        """The stored record of a task (empty when unknown or expired)."""

    def revoke_pending(self, task_id: str, raw_event: bytes, channel: str) -> bool:
        """Mark a task REVOKED if it has not started; return whether it was."""

    def purge(self, queues: Sequence[str]) -> list[str]:
        """Delete the messages waiting on ``queues`` (ETA ones too), not ones being run.

        Returns the task ids the broker saw beside them (unverified).
        """

    # Worker side -------------------------------------------------------------------------
    def ensure_queues(self, queues: Iterable[str]) -> None:
        """Create the queues (idempotent)."""

    def fetch(self, queues: Sequence[str], consumer: str, block_seconds: float) -> Delivery | None:
        """Take one message for ``consumer``, waiting up to ``block_seconds``."""

    def start(self, task_id: str, record: Mapping[str, str]) -> str | None:
        """Record a task as STARTED (atomically checked); else return the state forbidding it."""

    def forget_unsent(self, task_id: str) -> None:
        """Delete a record that only a start check wrote: no client ever sent that task."""

    def emit(self, channel: str, raw_events: Sequence[bytes]) -> None:
        """Send events to a client's channel."""

    def finish(
        self,
        delivery: Delivery | None,
        task_id: str,
        channel: str,
        raw_event: bytes,
        record: Mapping[str, str | bytes],
        *,
        requeue: tuple[bytes, float] | None = None,
        then_fetch: tuple[Sequence[str], str, float] | None = None,
    ) -> Delivery | None:
        """Store the record, tell the client, park ``requeue`` for later, ack: atomically.

        With ``then_fetch=(queues, consumer, block_seconds)`` the broker may also take the
        next message in the same round trip and return it (else it returns ``None``).
        """

    def rate_wait(self, bucket: str, rate: float) -> float:
        """Take a token of ``bucket`` (``rate`` per second) or say how long to wait."""

    def send_control(self, raw: bytes) -> None:
        """Broadcast a signed control message to every worker."""

    def read_control(self, after: str) -> list[tuple[str, bytes]]:
        """Control messages after entry ``after`` (``"$"``: just the current last id)."""

    def discard(self, delivery: Delivery) -> None:
        """Acknowledge and delete a delivery that must not run."""

    def requeue(self, delivery: Delivery, task_id: str) -> None:
        """Put an unfinished delivery back on its queue, counting the redelivery."""

    def dead_letter(self, delivery: Delivery) -> None:
        """Move a delivery to the dead-letter stream (after its final state was stored)."""

    def pending_of(
        self, queues: Sequence[str], consumer: str, min_idle: float = 0.0
    ) -> list[Delivery]:
        """Unacknowledged deliveries held by ``consumer`` (lease idle for ``min_idle`` s)."""

    def holds_pending(self, queues: Sequence[str], consumers: Sequence[str]) -> bool:
        """True if any of ``consumers`` still holds an unacknowledged delivery."""

    def heartbeat(
        self, worker_id: str, info: str, consumers: Sequence[str], queues: Sequence[str]
    ) -> None:
        """Announce a live worker and renew the leases its consumers hold."""

    def unregister(self, worker_id: str, consumers: Sequence[str], queues: Sequence[str]) -> None:
        """Remove a stopped worker and its consumers."""

    def dead_workers(self) -> dict[str, str]:
        """Registered workers whose heartbeat has lapsed, ``{worker_id: info}``."""

    def claim_dead_worker(self, worker_id: str) -> bool:
        """Take the right to clean up after a dead worker (only one claimant wins)."""

    def stale_deliveries(self, queues: Sequence[str], consumer: str) -> list[Delivery]:
        """Deliveries whose lease lapsed (no renewal for ``visibility_timeout``)."""

    def move_due(self, queues: Sequence[str]) -> float | None:
        """Move due ETA messages onto their queues; return the next due time, if any."""

    def workers(self) -> dict[str, str]:
        """Live workers, ``{worker_id: info}``."""

    def forget_worker(self, worker_id: str) -> None:
        """Drop a dead worker from the registry once its deliveries are handled."""


#: URL schemes served by :class:`nbtask.brokers.kombu.KombuBroker` (imported lazily:
#: ``import nbtask`` never loads kombu).
KOMBU_SCHEMES = ("amqp", "amqps", "memory")


def open_broker(settings: Settings, url: str) -> Broker:
    """Open the broker for ``url``.

    Redis for ``redis``/``rediss``/``unix``; kombu for ``amqp``/``amqps``/``memory``
    (which needs ``settings.result_url``).
    """
    if url.split("://", 1)[0].lower() in KOMBU_SCHEMES:
        from nbtask.brokers.kombu import KombuBroker

        return KombuBroker(url, settings)
    from nbtask.brokers.redis import RedisBroker

    return RedisBroker(url, settings)
