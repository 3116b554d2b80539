"""The AMQP transport (RabbitMQ through kombu), with the Redis store beside it.

Task messages and live events travel over AMQP; everything that needs an atomic check or
must outlive a client stays in the Redis store (``Settings.result_url``). The design in
short (``docs/architecture.md`` has the whole of it):

* One durable queue per nbtask queue (``<key_prefix>:q:<queue>``), persistent messages
  published with confirms (a batch's awaited together, a single ``delay()``'s collected
  later: :mod:`nbtask.brokers.amqp_confirms`), the task id and nbtask's redelivery count
  as headers (never trusted: the worker checks the id against the signed header).
* Every worker child has its own connection with prefetch 1 (global across its queues):
  prefetch equals free slots.
* A delivery is acknowledged only after its outcome is stored. A dead child's messages
  come back from RabbitMQ marked redelivered; the start check then finds the task
  STARTED by someone else and says ``LOST``: the copy is parked in the store
  (:mod:`nbtask.brokers.amqp_lost`) and settled by a supervisor like a Redis pending
  entry of a dead child.
* Events go to one exclusive auto-delete reply queue per client and are also kept on the
  client's stream in the store, so a listener that (re)declares its queue catches up
  from there, and another process can re-attach; while someone else holds the queue,
  the listener reads the stream (:mod:`nbtask.brokers.amqp_replies`).
* ETA messages are parked in the store and published when due.
* RabbitMQ closes the channel of a consumer that holds a delivery past its
  ``consumer_timeout``: on RabbitMQ 3.12 and later the task queues are declared with a
  7-day ``x-consumer-timeout``; on older servers raise ``consumer_timeout``. AMQP
  heartbeats are off (a child runs user code and cannot answer them).

``memory://`` is in-process only (worker processes cannot share it): it serves tests of
the transport itself.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence

from nbtask._process import current_pid
from nbtask.brokers.amqp_channels import AmqpChannels
from nbtask.brokers.amqp_guards import (
    DELIVERIES_HEADER,
    ID_HEADER,
    body_of,
    read_headers,
    redelivered,
    refusal_of,
)
from nbtask.brokers.amqp_link import Link, Message
from nbtask.brokers.amqp_links import Links, kombu
from nbtask.brokers.amqp_lost import LostDeliveries
from nbtask.brokers.amqp_replies import Replies
from nbtask.brokers.amqp_upkeep import AmqpUpkeep
from nbtask.brokers.base import OWED_SECONDS
from nbtask.brokers.handoffs import Delivery, Publish, Settlement, StartBy, Verdict
from nbtask.brokers.redis_store import RedisStore
from nbtask.errors import BrokerUnavailable

__all__ = ["AmqpTransport"]

log = logging.getLogger(__name__)

_MOVING_STUCK = 30.0  # an ETA message claimed but not published after this is resent


class AmqpTransport(AmqpChannels, AmqpUpkeep):
    """A :class:`~nbtask.brokers.base.Transport` on kombu (AMQP) with a Redis store.

    Parameters
    ----------
    url
        A kombu URL: ``amqp://user:password@host:5672/vhost``, ``amqps://…``,
        ``memory://`` (in-process only).
    store
        The Redis store (``Settings.result_url``).
    """

    #: A reply queue is consumed by one connection: the thread that reads first.
    events_from_any_thread = False
    #: A durable queue keeps its messages while the Redis store restarts (and a worker
    #: starts a task whose record is gone): a missing record does not mean a lost task.
    queues_beside_records = False

    def __init__(self, url: str, store: RedisStore) -> None:
        self.url = url
        self._store = store
        self.settings = store.settings
        self.lost = LostDeliveries(store)
        self._prefix = self.settings.key_prefix
        self.links = Links(url)
        self._own_channels: set[str] = set()
        self.replies = Replies(self.links, store)
        self._whoami: tuple[str, int] = ("", -1)

    @property
    def store(self) -> RedisStore:
        """The Redis store holding records, channels' history, ETA parking, the registry."""
        return self._store

    # Names -----------------------------------------------------------------------------------
    def _queue_of(self, amqp_name: str) -> str:
        head = f"{self._prefix}:q:"
        return amqp_name[len(head) :] if amqp_name.startswith(head) else amqp_name

    # Lifecycle -------------------------------------------------------------------------------
    def ping(self) -> None:
        """Raise :class:`BrokerUnavailable` unless both RabbitMQ and the store answer."""
        self.store.ping()
        with self.links.using():
            pass

    def close(self) -> None:
        """Close every thread's AMQP connection and the store."""
        self.links.close()
        self.store.close()

    @contextlib.contextmanager
    def answers_within(self, seconds: float) -> Iterator[None]:
        """In the block, this thread gives up on an answer the broker owes after ``seconds``.

        RabbitMQ's and the store's alike: it raises :class:`BrokerUnavailable` then.
        """
        with self.links.answering_within(seconds), self.store.link.answering_within(seconds):
            yield

    # Client side -----------------------------------------------------------------------------
    def publish(self, messages: Sequence[Publish], *, wait: bool = True) -> list[str]:
        """Write the PENDING records (ETA ones parked in the store), then enqueue the rest.

        With ``wait``, return once RabbitMQ confirmed them all (their confirms awaited
        together); without, once they are written, the records too (see :meth:`flush`).
        """
        now = time.time()
        refused = self.store.write_pending(messages, wait=wait)
        queued = [
            msg
            for msg, why in zip(messages, refused, strict=True)
            if not why and not (msg.eta is not None and msg.eta > now)
        ]

        def send(link: Link) -> None:
            for msg in queued:
                self._enqueue(link, msg.queue, msg.task_id, msg.raw, 0)

        try:
            self.links.publishing(send, wait=wait)
        except BrokerUnavailable:
            # Nothing half-sent: no PENDING record is left for a message never queued.
            with contextlib.suppress(Exception):
                self.store.forget_pending(
                    (msg.task_id, str(msg.record.get("client", ""))) for msg in queued
                )
            raise
        return refused

    def _enqueue(self, link: Link, queue: str, task_id: str, raw: bytes, deliveries: int) -> None:
        name = self.queue_name(queue)
        self.links.queues.declare(link, name)
        headers = {ID_HEADER: task_id, DELIVERIES_HEADER: deliveries}
        self.links.send(link, name, raw, persistent=True, headers=headers, task_id=task_id)

    def flush(self) -> None:
        """Wait until RabbitMQ confirmed every message this thread sent (and their records).

        The store answers for the records first. Messages a dropped connection left
        unconfirmed are sent again first. Raises :class:`BrokerUnavailable` if RabbitMQ or
        the store cannot be reached; tasks whose messages or records could not be sent
        are then in :meth:`take_unsent`.
        """
        with self.store.link.translate_errors():
            self.store.link.settle_ended()
            self.store.link.settle_owed()
        self.links.flush()

    def settle_every_thread(self) -> None:
        """Before closing: read what other threads owe the store, then RabbitMQ (3 s each).

        Tasks whose records the store did not answer for by then (see
        :meth:`~nbtask.brokers.redis_owing.OwedReplies.settle_others`) are noted for
        :meth:`take_unsent`. Messages a dropped connection left behind are sent again;
        tasks whose messages RabbitMQ did not confirm by then are noted too (see
        :meth:`~nbtask.brokers.amqp_links.Links.settle_every_thread`).
        """
        with contextlib.suppress(BrokerUnavailable), self.store.link.translate_errors():
            self.store.link.settle_others(OWED_SECONDS)
        self.links.settle_every_thread()

    def sends_in_doubt(self) -> set[str]:
        """Ids of tasks whose records' writes were sent without waiting, not answered yet."""
        return self.store.link.in_doubt()

    def take_unsent(self) -> list[str]:
        """Ids of tasks sent earlier whose messages or records never arrived.

        RabbitMQ refused or never got the message, or the store did not write the record.
        Their ``publish`` had returned without waiting; each is taken once.
        """
        return [*self.store.link.take_unsent(), *self.links.take_unsent()]

    def still_queued(self, queues: Mapping[str, Collection[str]]) -> set[str]:
        """Nothing: a missing record never means a durable queue lost its message."""
        return set()

    def purge(self, queues: Sequence[str]) -> list[str]:
        """Delete the messages waiting on ``queues`` and parked for an ETA; their task ids.

        Deliveries a worker holds unacknowledged (tasks being run) are not touched.
        """
        ids: list[str] = []
        with self.links.using() as link:
            for queue in queues:
                for message in self.links.queues.waiting(link, self.queue_name(queue), ack=True):
                    task_id, _ = read_headers(message.headers)
                    ids += [task_id] if task_id else []
        return ids + self.store.take_waiting(queues)

    # Worker side -----------------------------------------------------------------------------
    def ensure_queues(self, queues: Iterable[str]) -> None:
        """Declare the durable task queues."""
        with self.links.using() as link:
            for queue in queues:
                self.links.queues.declare(link, self.queue_name(queue))

    def fetch(self, queues: Sequence[str], consumer: str, block_seconds: float) -> Delivery | None:
        """Take one message (prefetch 1), with its start verdict from the store."""
        deadline = time.monotonic() + block_seconds
        while True:
            with self.links.using() as link:
                self._consume_tasks(link, queues)
                # What comes first is often not a delivery (the confirm of the last
                # task's event): read on, on the same link, until one is in.
                while not link.inbox:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    try:
                        link.drain_events(timeout=remaining)
                    except TimeoutError:
                        return None
                queue, message = link.inbox.popleft()
                try:
                    delivery = self._accept(link, queue, message, consumer)
                except BrokerUnavailable:
                    # The store is away: keep the message (unacknowledged, it stays with
                    # this consumer) and take it again, rather than give it back.
                    link.inbox.appendleft((queue, message))
                    raise
            if delivery is not None:
                return delivery

    def _consume_tasks(self, link: Link, queues: Sequence[str]) -> None:
        names = tuple(self.queue_name(q) for q in queues)
        if link.task_queues == names:
            return
        for consumer in link.task_consumers:
            consumer.cancel()
        for name in names:
            self.links.queues.declare(link, name, again=True)
        # One unacknowledged message per child: for several queues the limit is global to
        # the channel (RabbitMQ applies a non-global one per consumer).
        link.channel.basic_qos(0, 1, len(names) > 1)
        link.task_consumers = [self._consume_queue(link, name) for name in names]
        link.task_queues = names

    def _consume_queue(self, link: Link, name: str) -> object:
        """Consume one task queue, its messages noted with it in the link's inbox.

        A delivery's queue is the one its consumer reads, never its routing key: whoever
        publishes through an exchange bound to the queue chooses that.
        """
        queue = self._queue_of(name)
        consumer = kombu.Consumer(
            link.channel,
            queues=[kombu.Queue(name, exchange="", routing_key=name, no_declare=True)],
            no_ack=False,
            on_message=lambda message: link.inbox.append((queue, message)),
        )
        consumer.consume()
        return consumer

    def _starter(self, consumer: str) -> StartBy:
        pid = current_pid()
        if self._whoami[1] != pid:
            self._whoami = (socket.gethostname(), pid)
        return StartBy(self._whoami[0], str(pid), consumer)

    def _accept(self, link: Link, queue: str, message: Message, consumer: str) -> Delivery | None:
        task_id, deliveries = read_headers(message.headers)
        raw = body_of(message)
        refusal = refusal_of(message)
        if refusal:
            # Before the start check and the signature: nbtask never sends such a message.
            log.error(
                "rejected message %s on queue %s: %s; moved to the dead-letter stream",
                message.delivery_tag,
                queue,
                refusal,
            )
            self.store.dead_letter(Delivery(queue, "", raw, deliveries, task_id=task_id))
            message.ack()
            return None
        verdict: str | None = None
        if task_id:
            by = self._starter(consumer)
            verdict = self.store.start(task_id, by, redelivered=redelivered(message))
            if verdict == Verdict.ASK:  # its message was put back: asked again once verified
                verdict = None
            if verdict == Verdict.LOST:
                log.warning(
                    "task %s was redelivered after its worker lost it; parked for its "
                    "supervisor to settle",
                    task_id,
                )
                self.lost.park(task_id, raw, queue, deliveries)
                message.ack()
                return None
        delivery_id = f"{link.generation}:{message.delivery_tag}"
        link.held[delivery_id] = message
        return Delivery(queue, delivery_id, raw, deliveries, verdict=verdict, task_id=task_id)

    def emit(self, channel: str, raw_events: Sequence[bytes]) -> None:
        """Keep events in the client's stream, publish them, and wait for their confirms.

        A confirm says the events are in the client's reply queue. The task's next events
        may leave from another thread, on another connection (its final event, from the
        task's own thread), and RabbitMQ orders messages only within one connection: sent
        sooner, a later event could reach the client first, which then drops the earlier
        one as old.
        """
        if not channel:
            return
        self.notify(channel, raw_events, entries=self.store.append_events(channel, raw_events))

    def finish(
        self,
        delivery: Delivery | None,
        task_id: str,
        channel: str,
        raw_event: bytes,
        fields: Mapping[str, str | bytes],
        *,
        requeue: tuple[bytes, float] | None = None,
        requeue_queue: str = "",
        then_fetch: tuple[Sequence[str], str, float] | None = None,
    ) -> Delivery | None:
        """Store the outcome (and park ``requeue``), tell the client, then acknowledge."""
        queue = delivery.queue if delivery is not None else ""
        end = Settlement(
            task_id, channel, raw_event, fields, queue, later=requeue, later_queue=requeue_queue
        )
        kept = self.store.settle_kept(end)[1]  # (logs an end after it was reported lost)
        # The event and the ack leave in one write (RabbitMQ gets them in one packet).
        with self.links.writes_together():
            if raw_event and channel:
                # The store's settle kept it. Not waiting for its confirm before the ack
                # is safe: RabbitMQ takes a channel's frames in order, so an ack that
                # arrives comes after the event; if neither arrives, the thread's next
                # link (its next fetch) sends the event again.
                self.notify(channel, [raw_event], wait=False, entries=[kept])
            if delivery is not None:
                self._settle(delivery)
        if then_fetch is not None and then_fetch[0]:
            try:
                return self.fetch(*then_fetch)
            except BrokerUnavailable as exc:
                # The outcome is stored and acknowledged: failing to take the next message
                # is not this task's failure (the caller would settle it again); the
                # child's next fetch tries again and says so.
                log.info("could not take the next message after task %s: %s", task_id, exc)
        return None

    def _settle(self, delivery: Delivery) -> None:
        """Acknowledge an AMQP delivery, or drop a parked lost one from the store."""
        if self.lost.settle(delivery):
            return
        link = self.links.current()
        message = link.held.pop(delivery.delivery_id, None) if link is not None else None
        if link is None or message is None:
            log.warning(
                "cannot acknowledge delivery %s: its connection was closed meanwhile; "
                "RabbitMQ redelivers it and the redelivered copy is dropped, since its task "
                "is settled",
                delivery.delivery_id,
            )
            return
        try:
            link.ack(message)
        except Exception as exc:
            self.links.drop()
            log.error(
                "could not acknowledge delivery %s (%s): the outcome is stored and the "
                "redelivered copy will be dropped. If RabbitMQ closed the channel for "
                "'delivery acknowledgement timed out', the task ran longer than its "
                "consumer_timeout: raise it (rabbitmq.conf consumer_timeout, see "
                "nbtask.brokers.amqp)",
                delivery.delivery_id,
                exc,
            )

    def discard(self, delivery: Delivery) -> None:
        """Acknowledge and drop a delivery that must not run."""
        self._settle(delivery)

    def requeue(self, delivery: Delivery, task_id: str) -> None:
        """Reset the record to PENDING, publish the message again (count raised), settle."""
        self.store.reset_pending(task_id)
        count = delivery.deliveries + 1
        self.links.publishing(
            lambda link: self._enqueue(link, delivery.queue, task_id, delivery.raw, count)
        )
        self._settle(delivery)

    def move(self, delivery: Delivery, queue: str, raw: bytes, task_id: str) -> None:
        """Publish ``raw`` (the delivery's message, sealed for ``queue``), then settle it."""
        count = delivery.deliveries
        self.links.publishing(lambda link: self._enqueue(link, queue, task_id, raw, count))
        self._settle(delivery)

    def dead_letter(self, delivery: Delivery) -> None:
        """Copy the message to the store's dead-letter stream, then settle it."""
        self.store.dead_letter(delivery)
        self._settle(delivery)

    def move_due(self, queues: Sequence[str]) -> float | None:
        """Publish due ETA messages to their queues; return the next due time."""
        nxt, moved = self.store.claim_due(queues, self._moving_key, _MOVING_STUCK)
        if moved:

            def send(link: Link) -> None:
                for queue, member in moved:
                    task_id, _, raw = member.partition(b":")
                    self._enqueue(link, queue, task_id.decode("utf-8", "replace"), raw, 0)

            self.links.publishing(send)
            self.store.drop_moved([(self._moving_key(q), m) for q, m in moved])
        return nxt
