"""A broker for any kombu URL (RabbitMQ over ``amqp://``/``amqps://``, ``memory://``).

Task messages and events travel over AMQP; everything that needs an atomic check or
must outlive a client stays in a Redis **result store** (``Settings.result_url``, env
``NBTASK_RESULT_URL``), driven through a :class:`~nbtask.brokers.redis.RedisBroker` on
that URL: task records and the atomic start check, re-attach (``app.handle(id)``),
revoke, ETA/countdown parking, rate limits, control messages and the worker registry.
Without a result store an AMQP broker is refused at connect time: re-attach and
exactly-once starts are impossible without it.

Task queues
    One durable classic queue per nbtask queue, named ``<key_prefix>:q:<queue>``, on the
    default exchange. Messages are persistent, published with publisher confirms, and
    carry the task id (``nbtask-id``, unverified: the worker checks it against the signed
    header) and nbtask's redelivery count (``nbtask-deliveries``) as headers. The broker
    never looks inside a body. Queues are declared by whoever publishes to them first.

Prefetch = free slots
    Every worker child has its own connection and channel with ``basic_qos(prefetch=1)``
    (global when it consumes several queues), so it holds at most the one message it
    runs. There is no priority between several queues (RabbitMQ round-robins them).

Acknowledgement
    As on Redis, a delivery is acknowledged only after its outcome is stored (and the
    client told), whatever the task's ``acks_late``. The difference between the two
    shows when a child dies: its connection closes and RabbitMQ redelivers the message
    with ``redelivered=True``. The receiving child's fetch looks at the record in the
    same Redis call as the start check: a redelivered message whose task is still
    ``STARTED`` is a *lost delivery*. It is parked in the store (``<prefix>:lost``, with
    the consumer that held it), acknowledged on AMQP, and settled by a supervisor exactly
    like a Redis pending entry of a dead child: ``acks_late`` tasks are put back (record
    reset to PENDING first, redelivery count raised, dead-lettered past
    ``max_redeliveries``), early-ack tasks are reported ``WORKER_LOST``. Supervisors find
    parked deliveries through the dead-worker sweep they run every heartbeat (a pseudo
    worker :data:`LOST_HOLDER` is listed while any is parked) and through
    ``pending_of``/``stale_deliveries``. A parked task that a live worker still lists as
    busy (its channel closed but it runs on) is left alone until it ends.

    Dropped connections: a publish on a connection that went stale while idle is sent
    once more on a new one (a duplicate is dropped by the start check); a publish that
    still fails deletes the PENDING records it wrote. A start check whose reply is lost
    with the store's connection leaves the task STARTED by the asking child, which keeps
    the message and asks again: its own STARTED counts as OK.

    A hard time limit or ``revoke(terminate=True)`` kills a child: the supervisor stores
    that outcome (TimeLimitExceeded, REVOKED) as soon as the child is gone, so the copy
    RabbitMQ gives back finds the task final and is dropped.

Events
    One exclusive, auto-delete reply queue per client, named after its channel
    (``<key_prefix>:c:<client id>``), declared and consumed by the client's listener
    thread (the first channel it keeps alive). Workers publish events to it (transient,
    no confirms); a client that is gone simply drops them. Every event is also appended
    to the client's Redis stream in the store (as with the Redis broker), so: a listener
    that (re)declares its queue first catches up from that stream on what it may have
    missed (a handle ignores an event it already applied); another process re-attaching
    to a task (an adopted channel) and a worker waiting on a subtask read the stream
    instead of the exclusive queue, and ``replay`` replays output as well as final
    states. Ids returned by ``read_events`` for AMQP events are synthetic and increasing.

ETA / countdown / retry
    Parked in the store's sorted set ``<prefix>:eta:<queue>`` (never held unacknowledged
    by a worker); the supervisor's ``move_due`` claims due members atomically into
    ``<prefix>:eta-moving:<queue>``, publishes them to AMQP and then drops them (a member
    stuck there 30 s after a crash is published again; the start check makes a duplicate
    harmless).

RabbitMQ's ``consumer_timeout``
    RabbitMQ closes the channel of a consumer that holds a delivery unacknowledged past
    ``consumer_timeout`` (default 30 minutes), so a task running longer loses its channel
    and the message is redelivered. On RabbitMQ 3.12 and later nbtask declares its task
    queues with ``x-consumer-timeout`` = :data:`CONSUMER_TIMEOUT_MS` (7 days). On older
    servers (3.10 here) the server-wide value applies: raise it for long tasks
    (``consumer_timeout = 604800000`` in rabbitmq.conf, or at run time
    ``rabbitmqctl eval 'application:set_env(rabbit, consumer_timeout, 604800000).'``).
    When it strikes, the redelivered copy is parked but not settled while the running
    worker lists the task as busy; the task finishes and stores its outcome, and the
    failed acknowledgement is logged with this advice. AMQP heartbeats are off for the
    same reason (a child runs user code and cannot answer them); TCP keepalive remains.

``memory://`` is in-process only (worker processes cannot share it) and kombu's memory
channel does not give unacknowledged messages back when it closes: it serves tests of the
broker itself.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import kombu as _kombu
from kombu.exceptions import OperationalError

from nbtask._urls import redact_url
from nbtask.brokers import Delivery, Publish, kombu_scripts
from nbtask.brokers.kombu_lost import LOST_HOLDER, LostDeliveries
from nbtask.brokers.redis import CHANNEL_MAXLEN, RedisBroker
from nbtask.errors import BrokerUnavailable, ConfigurationError
from nbtask.settings import Settings

__all__ = ["CONSUMER_TIMEOUT_MS", "LOST_HOLDER", "KombuBroker"]

log = logging.getLogger(__name__)

#: ``x-consumer-timeout`` of task queues on RabbitMQ >= 3.12, milliseconds (7 days).
CONSUMER_TIMEOUT_MS = 7 * 24 * 3600 * 1000
_MOVING_STUCK = 30.0  # an ETA message claimed but not published after this is resent
_ID_HEADER = "nbtask-id"
_DELIVERIES_HEADER = "nbtask-deliveries"
# kombu is only partly annotated: used as Any, its objects checked where read.
kombu: Any = _kombu
Message = Any
_CONTENT = {"content_type": "application/octet-stream", "content_encoding": "binary"}


class _Link:
    """One thread's AMQP connection, its channel, and what it consumes."""

    def __init__(self, conn: Any, generation: int) -> None:
        self.conn = conn
        self.channel: Any = conn.channel()
        self.generation = generation
        self.declared: set[str] = set()
        self.task_queues: tuple[str, ...] = ()
        self.task_consumer: Any = None
        self.inbox: deque[Message] = deque()
        self.held: dict[str, Message] = {}
        self.reply: str | None = None
        self.reply_consumer: Any = None
        self.replies: deque[Message] = deque()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.release()


class KombuBroker:
    """A :class:`~nbtask.brokers.Broker` on kombu (AMQP) with a Redis result store.

    Parameters
    ----------
    url
        A kombu URL: ``amqp://user:password@host:5672/vhost``, ``amqps://…``,
        ``memory://`` (in-process only).
    settings
        ``result_url`` (required), key prefix, TTLs, heartbeat interval.
    """

    def __init__(self, url: str, settings: Settings) -> None:
        if not settings.result_url:
            raise ConfigurationError(
                f"the broker {redact_url(url)} needs a result store: set NBTASK_RESULT_URL (or "
                "Settings(result_url=...)) to a Redis URL, e.g. redis://127.0.0.1:6379/0. "
                "Task records, exactly-once starts, revoke, ETA/countdown and re-attach "
                "(app.handle(id)) live there"
            )
        self.url = url
        self.settings = settings
        self.store = RedisBroker(settings.result_url, settings, role="result store")
        self.lost = LostDeliveries(self.store)
        self._prefix = settings.key_prefix
        self._ttl = int(settings.result_ttl)
        self._local = threading.local()
        self._generations = itertools.count(1)
        self._links: list[_Link] = []
        self._links_lock = threading.Lock()
        self._own_channels: set[str] = set()
        self._store_positions: dict[str, str] = {}
        self._event_ids = itertools.count(1)
        self._whoami: tuple[str, int] = ("", -1)
        redis_client = self.store.redis
        self._start = redis_client.register_script(kombu_scripts.START)
        self._record = redis_client.register_script(kombu_scripts.RECORD)
        self._move = redis_client.register_script(kombu_scripts.MOVE_DUE)
        self._consumer_timeout: bool | None = None

    # Names -----------------------------------------------------------------------------------
    def channel_key(self, client_id: str) -> str:
        """A client's channel name: its reply queue here, its stream in the store."""
        return self.store.channel_key(client_id)

    def queue_name(self, queue: str) -> str:
        """The AMQP queue holding ``queue``'s messages."""
        return f"{self._prefix}:q:{queue}"

    def _queue_of(self, amqp_name: str) -> str:
        head = f"{self._prefix}:q:"
        return amqp_name[len(head) :] if amqp_name.startswith(head) else amqp_name

    def _moving_key(self, queue: str) -> str:
        return f"{self._prefix}:eta-moving:{queue}"

    # Connections -----------------------------------------------------------------------------
    def _link(self) -> _Link:
        link: _Link | None = getattr(self._local, "link", None)
        if link is not None:
            return link
        conn = kombu.Connection(
            self.url,
            connect_timeout=5,
            heartbeat=0,  # a child runs user code and cannot answer AMQP heartbeats
            transport_options={"confirm_publish": True},
        )
        try:
            conn.ensure_connection(max_retries=1, timeout=5)
        except Exception as exc:
            conn.release()
            raise self._unavailable(exc) from exc
        link = _Link(conn, next(self._generations))
        self._local.link = link
        with self._links_lock:
            self._links.append(link)
        return link

    def _drop_link(self) -> None:
        link: _Link | None = getattr(self._local, "link", None)
        self._local.link = None
        if link is not None:
            link.close()
            with self._links_lock, contextlib.suppress(ValueError):
                self._links.remove(link)

    def _unavailable(self, exc: BaseException) -> BrokerUnavailable:
        return BrokerUnavailable(
            f"cannot reach the AMQP broker at {redact_url(self.url)}: {exc}. Is RabbitMQ running "
            "there? (start it with: rabbitmq-server -detached)"
        )

    @contextlib.contextmanager
    def _amqp(self) -> Iterator[_Link]:
        """Yield this thread's link; connection errors become :class:`BrokerUnavailable`."""
        link = self._link()
        errors: tuple[type[BaseException], ...] = (OSError, OperationalError, *_conn_errors(link))
        try:
            yield link
        except errors as exc:
            if isinstance(exc, TimeoutError):
                raise
            if isinstance(exc, BrokerUnavailable):
                raise  # the result store's: the AMQP link is fine, and it names the store
            self._drop_link()
            raise self._unavailable(exc) from exc

    def _publishing(self, send: Callable[[_Link], None]) -> None:
        """Run ``send`` on this thread's link; once more on a new link if an old one failed.

        A link that went stale while idle (its connection dropped, RabbitMQ restarted)
        fails only when used; a fresh link failing is a real outage. At worst a message
        that reached RabbitMQ just before its connection died is sent twice: the start
        check drops the second task message, a handle ignores a repeated event.
        """
        for attempt in (1, 2):
            fresh = getattr(self._local, "link", None) is None
            try:
                with self._amqp() as link:
                    send(link)
                return
            except BrokerUnavailable:
                if fresh or attempt == 2:
                    raise

    def _declare_task_queue(self, link: _Link, name: str) -> None:
        if name in link.declared:
            return
        arguments: dict[str, Any] = {}
        if self._supports_consumer_timeout(link):
            arguments["x-consumer-timeout"] = CONSUMER_TIMEOUT_MS
        link.channel.queue_declare(
            queue=name, durable=True, exclusive=False, auto_delete=False,
            arguments=arguments or None,
        )  # fmt: skip
        link.declared.add(name)

    def _supports_consumer_timeout(self, link: _Link) -> bool:
        if self._consumer_timeout is None:
            props = getattr(link.conn.connection, "server_properties", None) or {}
            version = props.get("version", b"")
            text = version.decode() if isinstance(version, bytes) else str(version)
            try:
                major, minor = (int(part) for part in text.split(".")[:2])
            except ValueError:
                major, minor = 0, 0
            self._consumer_timeout = (major, minor) >= (3, 12) and "RabbitMQ" in str(
                props.get("product", b"")
            )
        return self._consumer_timeout

    def _send(
        self,
        link: _Link,
        routing_key: str,
        raw: bytes,
        *,
        persistent: bool,
        headers: Mapping[str, Any] | None = None,
    ) -> None:
        message = link.channel.prepare_message(
            raw, priority=None, headers=dict(headers or {}),
            properties={"delivery_mode": 2 if persistent else 1}, **_CONTENT,
        )  # fmt: skip
        link.channel.basic_publish(message, exchange="", routing_key=routing_key)

    # Lifecycle -------------------------------------------------------------------------------
    def ping(self) -> None:
        """Raise :class:`BrokerUnavailable` unless both RabbitMQ and the store answer."""
        self.store.ping()
        with self._amqp():
            pass

    def close(self) -> None:
        """Close every thread's AMQP connection and the store."""
        with self._links_lock:
            links, self._links = self._links, []
        for link in links:
            link.close()
        self._local = threading.local()
        self.store.close()

    # Client side -----------------------------------------------------------------------------
    def publish(self, messages: Sequence[Publish]) -> None:
        """Write the PENDING records (ETA ones parked in the store), then enqueue the rest."""
        now = time.time()
        pipe = self.store.redis.pipeline(transaction=False)
        for msg in messages:
            due = msg.eta is not None and msg.eta > now
            fields = [part for item in msg.record.items() for part in item]
            keys = [self.store.record_key(msg.task_id), self.store.eta_key(msg.queue)]
            client = msg.record.get("client")
            if client:
                keys.append(self.store.client_tasks_key(client))
            member = msg.task_id.encode() + b":" + msg.raw if due else b""
            self._record(
                keys=keys,
                args=[self._ttl, repr(now), msg.task_id, repr(msg.eta) if due else "", member,
                      *fields],
                client=pipe,
            )  # fmt: skip
        with self.store.translate_errors():
            sent = pipe.execute()
        queued = [
            msg for msg, ok in zip(messages, sent, strict=True)
            if ok and not (msg.eta is not None and msg.eta > now)
        ]  # fmt: skip

        def send(link: _Link) -> None:
            for msg in queued:
                self._enqueue(link, msg.queue, msg.task_id, msg.raw, 0)

        try:
            self._publishing(send)
        except BrokerUnavailable:
            # Nothing half-sent: no PENDING record is left for a message never queued.
            with contextlib.suppress(Exception):
                pipe = self.store.redis.pipeline(transaction=False)
                for msg in queued:
                    pipe.delete(self.store.record_key(msg.task_id))
                    client = msg.record.get("client")
                    if client:
                        pipe.zrem(self.store.client_tasks_key(client), msg.task_id)
                pipe.execute()
            raise

    def _enqueue(self, link: _Link, queue: str, task_id: str, raw: bytes, deliveries: int) -> None:
        name = self.queue_name(queue)
        self._declare_task_queue(link, name)
        headers = {_ID_HEADER: task_id, _DELIVERIES_HEADER: deliveries}
        self._send(link, name, raw, persistent=True, headers=headers)

    def read_events(
        self, channels: Mapping[str, str], block_seconds: float
    ) -> list[tuple[str, str, bytes]]:
        """Events of this client's reply queue, and of adopted channels (from the store).

        A channel this broker keeps alive (:meth:`keep_channel`) is read from its AMQP
        reply queue; any other from the store's stream of final events.
        """
        own = [c for c in channels if c in self._own_channels]
        foreign = {c: p for c, p in channels.items() if c not in self._own_channels}
        deadline = time.monotonic() + block_seconds
        while True:
            out: list[tuple[str, str, bytes]] = []
            remaining = deadline - time.monotonic()
            if own:
                out += self._read_replies(own[0], 0.0 if foreign else max(remaining, 0.0))
            if foreign:
                out += self.store.read_events(foreign, 0.001) if not out else []
            remaining = deadline - time.monotonic()
            if out or remaining <= 0:
                return out
            if foreign and own:
                out = self._read_replies(own[0], min(0.25, remaining))
                if out:
                    return out
            elif foreign:
                return self.store.read_events(foreign, min(remaining, 0.5))

    def _read_replies(self, channel: str, block_seconds: float) -> list[tuple[str, str, bytes]]:
        out: list[tuple[str, str, bytes]] = []
        link: _Link | None = None
        try:
            with self._amqp() as link:
                if link.reply != channel:
                    out += self._consume_replies(link, channel)
                if not link.replies and not out and block_seconds > 0:
                    with contextlib.suppress(TimeoutError):
                        link.conn.drain_events(timeout=block_seconds)
                # Anything else already buffered comes along without waiting.
                with contextlib.suppress(TimeoutError):
                    while True:
                        link.conn.drain_events(timeout=0)
        except BrokerUnavailable:
            # Events already read (a catch-up, whose position has moved on, or received
            # ones: no_ack) are handed over all the same; the next read reconnects.
            if not out and (link is None or not link.replies):
                raise
        assert link is not None
        while link.replies:
            message = link.replies.popleft()
            out.append((channel, self._next_event_id(), _body(message)))
        return out

    def _next_event_id(self) -> str:
        return f"{int(time.time() * 1000)}-{next(self._event_ids)}"

    def _consume_replies(self, link: _Link, channel: str) -> list[tuple[str, str, bytes]]:
        """Declare and consume the reply queue; return final events missed meanwhile."""
        link.channel.queue_declare(queue=channel, durable=False, exclusive=True, auto_delete=True)
        queue = kombu.Queue(channel, exchange="", routing_key=channel, durable=False,
                            exclusive=True, auto_delete=True, no_declare=True)  # fmt: skip
        consumer = kombu.Consumer(link.channel, queues=[queue], no_ack=True,
                                  on_message=link.replies.append)  # fmt: skip
        consumer.consume()
        link.reply, link.reply_consumer = channel, consumer
        # What was sent before the queue existed (or while it was gone) reached only the
        # store: catch up from there, from where the last catch-up stopped. Without the
        # store, the next read starts over on a new connection (queue and catch-up both)
        # instead of carrying on with a gap.
        after = self._store_positions.get(channel, "0-0")
        try:
            with self.store.translate_errors():
                missed = self.store.redis.xrange(
                    channel, f"({after}" if after != "0-0" else "-", "+"
                )
                end = None if missed else self.store.channel_end(channel)
        except BrokerUnavailable:
            self._drop_link()
            raise
        out = []
        for entry_id, fields in missed:
            self._store_positions[channel] = entry_id.decode()
            raw = fields.get(b"e", b"")
            if raw:
                out.append((channel, self._next_event_id(), raw))
        if end is not None:
            self._store_positions[channel] = end
        return out

    def channel_end(self, channel: str) -> str:
        """The newest stored event id of a channel (final events are stored)."""
        return self.store.channel_end(channel)

    def replay(self, channel: str) -> list[bytes]:
        """Every event still kept for a client, oldest first."""
        return self.store.replay(channel)

    def wake(self, channel: str) -> None:
        """Send an empty event so a reader blocked on ``channel`` returns."""
        if channel in self._own_channels:
            self._send_events(channel, [b""])
        else:
            self.store.wake(channel)

    def keep_channel(self, channel: str) -> None:
        """Mark ``channel`` as this client's own (read from AMQP) and keep its stream."""
        self._own_channels.add(channel)
        self.store.keep_channel(channel)

    def recent_tasks(self, group: str, channel: str, limit: int) -> list[tuple[str, str, float]]:
        """See :meth:`RedisBroker.recent_tasks`."""
        return self.store.recent_tasks(group, channel, limit)

    def get_record(self, task_id: str) -> dict[str, bytes]:
        """The task's stored record."""
        return self.store.get_record(task_id)

    def revoke_pending(self, task_id: str, raw_event: bytes, channel: str) -> bool:
        """Mark a not-yet-started task REVOKED in the store and tell its client."""
        if not self.store.revoke_pending(task_id, raw_event, channel):
            return False
        self._send_events(channel, [raw_event])  # the store's script kept it
        return True

    # Worker side -----------------------------------------------------------------------------
    def ensure_queues(self, queues: Iterable[str]) -> None:
        """Declare the durable task queues."""
        with self._amqp() as link:
            for queue in queues:
                self._declare_task_queue(link, self.queue_name(queue))

    def fetch(self, queues: Sequence[str], consumer: str, block_seconds: float) -> Delivery | None:
        """Take one message (prefetch 1), with its start verdict from the store."""
        deadline = time.monotonic() + block_seconds
        while True:
            with self._amqp() as link:
                self._consume_tasks(link, queues)
                if not link.inbox:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    try:
                        link.conn.drain_events(timeout=remaining)
                    except TimeoutError:
                        return None
                    continue
                message = link.inbox.popleft()
                try:
                    delivery = self._accept(link, message, consumer)
                except BrokerUnavailable:
                    # The store is away: keep the message (unacknowledged, it stays with
                    # this consumer) and take it again, rather than give it back.
                    link.inbox.appendleft(message)
                    raise
            if delivery is not None:
                return delivery

    def _consume_tasks(self, link: _Link, queues: Sequence[str]) -> None:
        names = tuple(self.queue_name(q) for q in queues)
        if link.task_queues == names:
            return
        if link.task_consumer is not None:
            link.task_consumer.cancel()
        for name in names:
            self._declare_task_queue(link, name)
        # One unacknowledged message per child: for several queues the limit is global to
        # the channel (RabbitMQ applies a non-global one per consumer).
        link.channel.basic_qos(0, 1, len(names) > 1)
        kqueues = [kombu.Queue(n, exchange="", routing_key=n, no_declare=True) for n in names]
        consumer = kombu.Consumer(link.channel, queues=kqueues, no_ack=False,
                                  on_message=link.inbox.append)  # fmt: skip
        consumer.consume()
        link.task_queues, link.task_consumer = names, consumer

    def _identity(self) -> tuple[str, int]:
        pid = os.getpid()
        if self._whoami[1] != pid:
            self._whoami = (socket.gethostname(), pid)
        return self._whoami

    def _accept(self, link: _Link, message: Message, consumer: str) -> Delivery | None:
        task_id, deliveries = _read_headers(message.headers)
        redelivered = _redelivered(message)
        queue = self._queue_of(str(message.delivery_info.get("routing_key", "")))
        raw = _body(message)
        verdict: str | None = None
        if task_id:
            with self.store.translate_errors():
                reply = self._start(args=[
                    task_id, self.store.record_key(""), self._ttl, *self._identity(), consumer,
                    "1" if redelivered else "0",
                ])  # fmt: skip
            verdict = reply.decode() if isinstance(reply, bytes) else str(reply)
            if verdict == "LOST":
                log.warning("task %s was redelivered after its worker lost it; parked for its "
                            "supervisor to settle", task_id)  # fmt: skip
                self.lost.park(task_id, raw, queue, deliveries)
                message.ack()
                return None
        delivery_id = f"{link.generation}:{message.delivery_tag}"
        link.held[delivery_id] = message
        return Delivery(queue, delivery_id, raw, deliveries, verdict=verdict, task_id=task_id)

    def start(self, task_id: str, record: Mapping[str, str]) -> str | None:
        """Mark STARTED unless the task must not run (for deliveries without a verdict)."""
        return self.store.start(task_id, record)

    def forget_unsent(self, task_id: str) -> None:
        """Delete a record that only a start check wrote (in the store)."""
        self.store.forget_unsent(task_id)

    def emit(self, channel: str, raw_events: Sequence[bytes]) -> None:
        """Keep events in the client's stream, then publish them to its reply queue."""
        if not channel:
            return
        self.store.emit(channel, raw_events)
        self._send_events(channel, raw_events)

    def _send_events(self, channel: str, raw_events: Sequence[bytes]) -> None:
        """Publish events to a client's reply queue (dropped if the client is gone)."""

        def send(link: _Link) -> None:
            for raw in raw_events:
                self._send(link, channel, raw, persistent=False)

        self._publishing(send)

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
        """Store the outcome (and park ``requeue``), tell the client, then acknowledge."""
        # The store's finish with an empty entry id: record, stream event, ETA park; no ack.
        parked = None if delivery is None else Delivery(delivery.queue, "", b"")
        self.store.finish(parked, task_id, channel, raw_event, record, requeue=requeue)
        if raw_event and channel:
            self._send_events(channel, [raw_event])  # the store's finish kept it
        if delivery is not None:
            self._settle(delivery)
        if then_fetch is not None and then_fetch[0]:
            return self.fetch(*then_fetch)
        return None

    def _settle(self, delivery: Delivery) -> None:
        """Acknowledge an AMQP delivery, or drop a parked lost one from the store."""
        if self.lost.settle(delivery):
            return
        link: _Link | None = getattr(self._local, "link", None)
        message = link.held.pop(delivery.delivery_id, None) if link is not None else None
        if message is None:
            log.warning("cannot acknowledge delivery %s: its connection was closed meanwhile; "
                        "RabbitMQ redelivers it and the redelivered copy is dropped, since "
                        "its task is settled", delivery.delivery_id)  # fmt: skip
            return
        try:
            message.ack()
        except Exception as exc:
            self._drop_link()
            log.error(
                "could not acknowledge delivery %s (%s): the outcome is stored and the "
                "redelivered copy will be dropped. If RabbitMQ closed the channel for "
                "'delivery acknowledgement timed out', the task ran longer than its "
                "consumer_timeout: raise it (rabbitmq.conf consumer_timeout, see "
                "nbtask.brokers.kombu)", delivery.delivery_id, exc,
            )  # fmt: skip

    def rate_wait(self, bucket: str, rate: float) -> float:
        """Take the token of ``bucket`` or say how long to wait."""
        return self.store.rate_wait(bucket, rate)

    def send_control(self, raw: bytes) -> None:
        """Broadcast a signed control message (through the store)."""
        self.store.send_control(raw)

    def read_control(self, after: str) -> list[tuple[str, bytes]]:
        """Control messages after ``after`` (through the store)."""
        return self.store.read_control(after)

    def discard(self, delivery: Delivery) -> None:
        """Acknowledge and drop a delivery that must not run."""
        self._settle(delivery)

    def requeue(self, delivery: Delivery, task_id: str) -> None:
        """Reset the record to PENDING, publish the message again (count raised), settle."""
        with self.store.translate_errors():
            self.store.redis.hset(self.store.record_key(task_id), "state", "PENDING")
        self._publishing(lambda link: self._enqueue(
            link, delivery.queue, task_id, delivery.raw, delivery.deliveries + 1
        ))  # fmt: skip
        self._settle(delivery)

    def dead_letter(self, delivery: Delivery) -> None:
        """Copy the message to the store's dead-letter stream, then settle it."""
        with self.store.translate_errors():
            self.store.redis.xadd(
                self.store.dead_letter_key,
                {"e": delivery.raw, "q": delivery.queue, "n": delivery.deliveries},
                maxlen=CHANNEL_MAXLEN,
                approximate=True,
            )
        self._settle(delivery)

    def pending_of(
        self, queues: Sequence[str], consumer: str, min_idle: float = 0.0
    ) -> list[Delivery]:
        """Claim parked lost deliveries: all for :data:`LOST_HOLDER`, else ``consumer``'s.

        AMQP itself gives a dead consumer's deliveries back; only the ones already parked
        by whoever received them again are returned (``min_idle`` does not apply).
        """
        return self.lost.claim(None if consumer == LOST_HOLDER else consumer)

    def holds_pending(self, queues: Sequence[str], consumers: Sequence[str]) -> bool:
        """False for real consumers: AMQP gives their deliveries back by itself.

        True for :data:`LOST_HOLDER`, a pseudo worker that is never registered and so
        never unregistered.
        """
        return LOST_HOLDER in consumers

    def heartbeat(
        self, worker_id: str, info: str, consumers: Sequence[str], queues: Sequence[str]
    ) -> None:
        """Announce a live worker (AMQP needs no lease renewal)."""
        self.store.heartbeat(worker_id, info, (), ())

    def unregister(self, worker_id: str, consumers: Sequence[str], queues: Sequence[str]) -> None:
        """Forget a worker."""
        self.store.unregister(worker_id, (), ())

    def dead_workers(self) -> dict[str, str]:
        """Workers whose heartbeat lapsed, plus :data:`LOST_HOLDER` if deliveries wait.

        Those are deliveries lost by dead children, parked to be settled.
        """
        dead = self.store.dead_workers()
        if self.lost.waiting():
            dead[LOST_HOLDER] = json.dumps({"queues": [], "consumers": [LOST_HOLDER]})
        return dead

    def claim_dead_worker(self, worker_id: str) -> bool:
        """Win the right to clean up after ``worker_id``."""
        return self.store.claim_dead_worker(worker_id)

    def stale_deliveries(self, queues: Sequence[str], consumer: str) -> list[Delivery]:
        """Parked lost deliveries (a backstop to the dead-worker sweep)."""
        return self.lost.claim(None)

    def move_due(self, queues: Sequence[str]) -> float | None:
        """Publish due ETA messages to their queues; return the next due time."""
        keys: list[str] = []
        for queue in queues:
            keys += [self.store.eta_key(queue), self._moving_key(queue)]
        now = time.time()
        with self.store.translate_errors():
            reply = self._move(keys=keys, args=[repr(now), repr(now - _MOVING_STUCK)])
        nxt = float(reply[0].decode()) if reply and reply[0] else None
        moved = list(zip(reply[1::2], reply[2::2], strict=True))
        if moved:

            def send(link: _Link) -> None:
                for index, member in moved:
                    queue = queues[int(index) - 1]
                    task_id, _, raw = bytes(member).partition(b":")
                    self._enqueue(link, queue, task_id.decode(), raw, 0)

            self._publishing(send)
            pipe = self.store.redis.pipeline(transaction=False)
            for index, member in moved:
                pipe.zrem(self._moving_key(queues[int(index) - 1]), member)
            with self.store.translate_errors():
                pipe.execute()
        return nxt

    def purge(self, queues: Sequence[str]) -> list[str]:
        """Delete the messages waiting on ``queues`` and parked for an ETA; their task ids.

        Deliveries a worker holds unacknowledged (tasks being run) are not touched.
        """
        ids: list[str] = []
        with self._amqp() as link:
            for queue in queues:
                name = self.queue_name(queue)
                self._declare_task_queue(link, name)
                waiting = kombu.Queue(name, exchange="", routing_key=name, no_declare=True)
                bound = waiting.bind(link.channel)
                while (message := bound.get(no_ack=True)) is not None:
                    task_id, _ = _read_headers(message.headers)
                    ids += [task_id] if task_id else []
        pipe = self.store.redis.pipeline(transaction=True)
        for queue in queues:
            pipe.zrange(self.store.eta_key(queue), 0, -1)
            pipe.delete(self.store.eta_key(queue))
        with self.store.translate_errors():
            replies = pipe.execute()
        for members in replies[::2]:
            ids += [bytes(member).partition(b":")[0].decode() for member in members]
        return ids

    def workers(self) -> dict[str, str]:
        """Live workers."""
        return self.store.workers()

    def forget_worker(self, worker_id: str) -> None:
        """Drop a dead worker from the registry."""
        self.store.forget_worker(worker_id)


def _read_headers(headers: object) -> tuple[str | None, int]:
    """The task id and redelivery count beside a message.

    Anyone may have set them, so anything malformed reads as absent (the worker then goes
    by the signed header).
    """
    if not isinstance(headers, Mapping):
        return None, 0
    task_id = headers.get(_ID_HEADER)
    if isinstance(task_id, bytes):
        task_id = task_id.decode("utf-8", "replace")
    count = headers.get(_DELIVERIES_HEADER)
    deliveries = count if isinstance(count, int) and 0 <= count < 1 << 31 else 0
    return (task_id if isinstance(task_id, str) and task_id else None), deliveries


def _body(message: Message) -> bytes:
    """The body as sent.

    py-amqp hands an empty body, or one sent with a text content encoding, over as ``str``.
    """
    body = message.body
    if isinstance(body, str):
        return body.encode("utf-8", "surrogateescape")
    return bytes(body)


def _redelivered(message: Message) -> bool:
    """The AMQP ``redelivered`` flag (kombu's virtual transports keep it in the payload)."""
    if message.delivery_info.get("redelivered"):
        return True
    payload = getattr(message, "_raw", None)
    return isinstance(payload, dict) and bool(payload.get("redelivered"))


def _conn_errors(link: _Link) -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (
        *link.conn.connection_errors,
        *link.conn.channel_errors,
    )
    return errors
