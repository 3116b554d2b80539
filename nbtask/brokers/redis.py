"""The Redis broker, on Redis Streams.

One Stream per queue with a consumer group, a sorted set per queue for ETA messages, one
Stream per client for events, and a hash per task for its result.

Delivery rules (see the README's "Delivery semantics"):

* A message stays in the group's pending list from delivery until the worker finishes,
  whatever the task's ``acks_late``; the supervisor renews the lease of every pending
  entry its children hold at each heartbeat, so a running task is never redelivered.
* When a child or a whole worker dies, its pending entries are handled by the supervisor
  (or by any live worker once the dead worker's heartbeat lapses): ``acks_late`` messages
  are put back, others are reported ``WORKER_LOST``.
* ETA messages wait in ``<prefix>:eta:<queue>`` and are moved to the stream when due, so
  no worker ever holds one unacknowledged.
* A read whose reply is lost with its connection may still have delivered an entry (and
  marked its task STARTED): after any connection error the consumer's next fetch takes
  such an entry back from its own pending list before it reads new ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from nbtask._urls import redact_url
from nbtask.brokers import Delivery, Publish
from nbtask.brokers import redis_scripts as scripts
from nbtask.errors import BrokerUnavailable
from nbtask.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["GROUP", "RedisBroker"]

GROUP = "workers"
_LARGE_BYTES = 1 << 20  # messages from here on are sent without extra copies
CHANNEL_MAXLEN = 10_000


_BROKER_HINT = (
    "Is redis-server running there? (start one with: redis-server --port 6379, or unset "
    "NBTASK_BROKER to use the embedded cluster)"
)
_STORE_HINT = "Is redis-server running there? (the result store: NBTASK_RESULT_URL)"


class RedisBroker:
    """A :class:`~nbtask.brokers.Broker` on Redis Streams.

    Parameters
    ----------
    url
        ``redis://``, ``rediss://`` or ``unix://`` URL of the server.
    settings
        Key prefix, TTLs, visibility timeout and heartbeat interval.
    role
        ``"broker"``, or ``"result store"`` when it serves another broker (named so in
        errors).
    """

    _SCRIPTS: ClassVar[dict[str, str]] = {
        "start": scripts.START, "started": scripts.STARTED, "fetch": scripts.FETCH,
        "finish": scripts.FINISH, "publish": scripts.PUBLISH, "rate": scripts.RATE,
    }  # fmt: skip

    def __init__(self, url: str, settings: Settings, role: str = "broker") -> None:
        self.url = url
        hint = _BROKER_HINT if role == "broker" else _STORE_HINT
        self._unreachable = (f"cannot reach the Redis {role} at {redact_url(url)}", hint)
        self.settings = settings
        self._prefix = settings.key_prefix
        # Typed as Any: redis-py's reply types are unions over decode_responses that would
        # need a cast at every call; this adapter checks the shapes it reads instead.
        # RESP2 keeps raw replies in one known shape for the hot path below.
        self.redis: Any = redis.Redis.from_url(url, socket_connect_timeout=5, protocol=2)
        self._last_seen: dict[str, str] = {}
        self._whoami: tuple[str, int] = ("", -1)
        self._sha = {
            name: hashlib.sha1(body.encode()).hexdigest() for name, body in self._SCRIPTS.items()
        }
        self._scripts = self._SCRIPTS
        self._local = threading.local()
        self._revoke = self.redis.register_script(scripts.REVOKE)
        self._move_due = self.redis.register_script(scripts.MOVE_DUE)
        self._purge = self.redis.register_script(scripts.PURGE)
        self._forget = self.redis.register_script(scripts.FORGET_UNSENT)
        self._recover = self.redis.register_script(scripts.RECOVER)
        self._ttl = int(settings.result_ttl)

    @contextlib.contextmanager
    def translate_errors(self) -> Iterator[None]:
        """Turn redis-py's connection errors into one :class:`BrokerUnavailable`."""
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError) as exc:
            what, hint = self._unreachable
            raise BrokerUnavailable(f"{what}: {exc}. {hint}") from exc

    # Keys ----------------------------------------------------------------------------------
    def queue_key(self, queue: str) -> str:
        """The stream holding ``queue``'s messages."""
        return f"{self._prefix}:q:{queue}"

    def eta_key(self, queue: str) -> str:
        """The sorted set holding ``queue``'s messages that are not due yet."""
        return f"{self._prefix}:eta:{queue}"

    def record_key(self, task_id: str) -> str:
        """The hash holding a task's state and result."""
        return f"{self._prefix}:r:{task_id}"

    def channel_key(self, client_id: str) -> str:
        """The stream carrying events to one client."""
        return f"{self._prefix}:c:{client_id}"

    def client_tasks_key(self, channel: str) -> str:
        """The tasks a client sent, by send time (written at publish, for recent_tasks)."""
        return f"{self._prefix}:client-tasks:{channel.rsplit(':', 1)[-1]}"

    @property
    def dead_letter_key(self) -> str:
        """The stream of messages given up on."""
        return f"{self._prefix}:dead"

    def _hb_key(self, worker_id: str) -> str:
        return f"{self._prefix}:hb:{worker_id}"

    @property
    def _workers_key(self) -> str:
        return f"{self._prefix}:workers"

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

    # Lifecycle -------------------------------------------------------------------------------
    def ping(self) -> None:
        """Raise :class:`BrokerUnavailable` unless the server answers."""
        with self.translate_errors():
            self.redis.ping()
            self._load_scripts()

    def close(self) -> None:
        """Close every pooled connection and this thread's own."""
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.disconnect()
        self.redis.close()
        self.redis.connection_pool.disconnect()

    # Client side -----------------------------------------------------------------------------
    def publish(self, messages: Sequence[Publish]) -> None:
        """Enqueue messages and write their PENDING records, in one round trip."""
        now = time.time()
        commands: list[tuple[Any, ...]] = []
        for msg in messages:
            due = None if msg.eta is None or msg.eta <= now else msg.eta
            fields = [part for item in msg.record.items() for part in item]
            record = self.record_key(msg.task_id)
            client = msg.record.get("client")
            index = (self.client_tasks_key(client),) if client else ()
            if len(msg.raw) < _LARGE_BYTES:
                keys = (self.queue_key(msg.queue), self.eta_key(msg.queue), record, *index)
                commands.append(self._evalsha(
                    "publish", keys, msg.raw, self._ttl, "" if due is None else repr(due),
                    msg.task_id, repr(now), *fields,
                ))  # fmt: skip
                continue
            # A large message skips the script: a script argument is one more copy of it
            # inside Redis. MULTI keeps the same all-or-nothing effect.
            commands.append(("MULTI",))
            if due is None:
                commands.append(("XADD", self.queue_key(msg.queue), "*", "e", msg.raw, "n", 0,
                                 "i", msg.task_id))  # fmt: skip
            else:
                member = msg.task_id.encode() + b":" + msg.raw
                commands.append(("ZADD", self.eta_key(msg.queue), repr(due), member))
            commands += [("HSET", record, *fields), ("EXPIRE", record, self._ttl)]
            for key in index:
                commands += [("ZADD", key, repr(now), msg.task_id),
                             ("ZREMRANGEBYSCORE", key, "-inf", repr(now - self._ttl)),
                             ("EXPIRE", key, self._ttl)]  # fmt: skip
            commands.append(("EXEC",))
        with self.translate_errors():
            self._run_scripts(commands, large=any(len(m.raw) >= _LARGE_BYTES for m in messages))

    def _evalsha(self, script: str, keys: Sequence[str], *args: Any) -> tuple[Any, ...]:
        return ("EVALSHA", self._sha[script], len(keys), *keys, *args)

    def _run_scripts(
        self, commands: Sequence[tuple[Any, ...]], *, large: bool = False
    ) -> list[Any]:
        """Run EVALSHA commands, loading the scripts first if the server lost them."""
        try:
            return self._run(commands, large=large)
        except NoScriptError:
            # Only a restarted (emptied) server answers NOSCRIPT, and it answers it for
            # every command of the batch, so running the batch again runs each once.
            self._load_scripts()
            return self._run(commands, large=large)

    def _connection(self) -> Any:
        # One connection per thread, kept: taking one from the pool on every call costs
        # a health-check syscall, more than the command itself on a local server.
        connection = getattr(self._local, "connection", None)
        if connection is None:
            pool = self.redis.connection_pool
            connection = pool.connection_class(**pool.connection_kwargs)
            self._local.connection = connection
        return connection

    def _run(
        self,
        commands: Sequence[tuple[Any, ...]],
        *,
        block_seconds: float = 0.0,
        raise_errors: bool = True,
        large: bool = False,
    ) -> list[Any]:
        """Send ``commands`` in one write and read every reply.

        ``block_seconds`` is how long a blocking command (XREAD BLOCK) may wait; the
        socket's read timeout is stretched past it for this call. With ``raise_errors``
        false, error replies are returned in their places instead of raised. ``large``
        says an argument may be big enough to send without copying it.

        A pipeline without redis-py's per-command bookkeeping: on the hot path (publish,
        fetch, start, finish) that bookkeeping costs more than the round trip itself.
        """
        packed = None
        for attempt in (1, 2):
            connection = self._connection()
            fresh = connection._sock is None  # redis-py has no public "is connected"
            replies: list[Any] = []
            error: ResponseError | None = None
            try:
                packed = packed or (
                    _pack(commands) if large else connection.pack_commands(commands)
                )
                connection.send_packed_command(packed)
                for _ in commands:
                    try:
                        if block_seconds:
                            timeout = block_seconds + (connection.socket_timeout or 5.0)
                            replies.append(connection.read_response(timeout=timeout))
                        else:
                            replies.append(connection.read_response())
                    except ResponseError as exc:
                        replies.append(exc)
                        error = error or exc
            except (RedisConnectionError, RedisTimeoutError):
                # A half-read connection cannot be reused; the next call reconnects.
                connection.disconnect()
                # A read served meanwhile may have delivered an entry: see fetch().
                self._local.read_lost = True
                # A connection that went stale while idle (the server restarted) fails
                # before the first reply: the server never ran these commands. Once more
                # on a new connection; a fresh one failing is a real outage.
                if attempt == 2 or fresh or replies:
                    raise
                continue
            except BaseException:
                connection.disconnect()
                raise
            break
        if error is not None and raise_errors:
            raise error
        return replies

    def read_events(
        self, channels: Mapping[str, str], block_seconds: float
    ) -> list[tuple[str, str, bytes]]:
        """Block on the client channels; return ``(channel, entry id, raw)`` triples."""
        block = max(1, int(block_seconds * 1000))
        command = ("XREAD", "COUNT", 500, "BLOCK", block, "STREAMS", *channels, *channels.values())
        with self.translate_errors():
            (reply,) = self._run([command], block_seconds=block_seconds)
        out: list[tuple[str, str, bytes]] = []
        for stream, entries in reply or ():
            name = stream.decode()
            for entry_id, fields in entries:
                raw = fields[1] if len(fields) >= 2 and fields[0] == b"e" else b""
                out.append((name, entry_id.decode(), raw))
        return out

    def channel_end(self, channel: str) -> str:
        """The id of the newest event on a channel (``"0-0"`` when empty)."""
        with self.translate_errors():
            (last,) = self._run([("XREVRANGE", channel, "+", "-", "COUNT", 1)])
        return str(last[0][0].decode()) if last else "0-0"

    def replay(self, channel: str) -> list[bytes]:
        """Every event still kept on a client's channel, oldest first."""
        with self.translate_errors():
            (entries,) = self._run([("XRANGE", channel, "-", "+", "COUNT", CHANNEL_MAXLEN)])
        return [f[1] for _id, f in entries if len(f) >= 2 and f[0] == b"e" and f[1]]

    def wake(self, channel: str) -> None:
        """Append an empty entry so a blocked reader returns."""
        with self.translate_errors():
            self.redis.xadd(channel, {"e": b""}, maxlen=CHANNEL_MAXLEN, approximate=True)

    def keep_channel(self, channel: str) -> None:
        """Push back the expiry of an event channel."""
        with self.translate_errors():
            self.redis.expire(channel, self._ttl)

    def recent_tasks(self, group: str, channel: str, limit: int) -> list[tuple[str, str, float]]:
        """Note ``channel`` as a client of ``group``; return the group's newest tasks.

        A group (``<prefix>:client-group:<group>``, a sorted set of channels) outlives its
        clients for ``result_ttl``: a restarted notebook kernel finds the tasks its earlier
        clients sent. Returns ``(task_id, channel, sent_at)``, newest first, at most
        ``limit`` (``limit=0`` only notes the client).
        """
        key = f"{self._prefix}:client-group:{group}"
        now = time.time()
        with self.translate_errors():
            pipe = self.redis.pipeline(transaction=False)
            pipe.zadd(key, {channel: now})
            pipe.zremrangebyscore(key, "-inf", now - self._ttl)
            pipe.expire(key, self._ttl)
            pipe.zrange(key, 0, -1)
            channels = [c.decode() for c in pipe.execute()[-1]]
            if limit <= 0:
                return []
            pipe = self.redis.pipeline(transaction=False)
            for name in channels:
                pipe.zrevrange(self.client_tasks_key(name), 0, limit - 1, withscores=True)
            replies = pipe.execute()
        found = [
            (task_id.decode(), name, float(score))
            for name, entries in zip(channels, replies, strict=True)
            for task_id, score in entries
        ]
        found.sort(key=lambda item: item[2], reverse=True)
        return found[:limit]

    def get_record(self, task_id: str) -> dict[str, bytes]:
        """The task's stored record, keys decoded; empty if unknown."""
        with self.translate_errors():
            raw: dict[bytes, bytes] = self.redis.hgetall(self.record_key(task_id))
        return {k.decode(): v for k, v in raw.items()}

    def revoke_pending(self, task_id: str, raw_event: bytes, channel: str) -> bool:
        """Mark a not-yet-started task REVOKED (atomically with the start check)."""
        with self.translate_errors():
            keys = [self.record_key(task_id), channel]
            return bool(self._revoke(keys=keys, args=[raw_event, self._ttl, CHANNEL_MAXLEN]))

    def purge(self, queues: Sequence[str]) -> list[str]:
        """Delete the messages waiting on ``queues`` (ETA ones too); their task ids."""
        keys = [key for queue in queues for key in (self.queue_key(queue), self.eta_key(queue))]
        with self.translate_errors():
            return [raw.decode() for raw in self._purge(keys=keys, args=[GROUP])]

    # Worker side -----------------------------------------------------------------------------
    def ensure_queues(self, queues: Iterable[str]) -> None:
        """Create each queue's stream and consumer group if missing."""
        with self.translate_errors():
            for queue in queues:
                try:
                    self.redis.xgroup_create(self.queue_key(queue), GROUP, id="0", mkstream=True)
                except ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise

    def fetch(self, queues: Sequence[str], consumer: str, block_seconds: float) -> Delivery | None:
        """Take one message, waiting up to ``block_seconds``; never more than one.

        The delivery comes with its start verdict (``Delivery.verdict``), decided by
        Redis in the same round trip.
        """
        with self.translate_errors():
            if getattr(self._local, "read_lost", False):
                recovered = self._recover_lost_read(queues, consumer)
                if recovered is not None:
                    return recovered
            if len(queues) == 1:
                return self._read_one(queues[0], consumer, block_seconds, ())
            with self._queues_may_be_gone(queues):
                return self._fetch_many(queues, consumer, block_seconds)
            return None

    def _read_one(
        self,
        queue: str,
        consumer: str,
        block_seconds: float,
        leading: Sequence[tuple[Any, ...]],
    ) -> Delivery | None:
        # One write: [leading commands,] a blocking read, and the start check that Redis
        # runs as soon as the read is served. One queue: the server hands each entry to
        # exactly one blocked consumer.
        stream = self.queue_key(queue)
        started = self._evalsha(
            "started", [stream], GROUP, consumer, self.record_key(""), self._ttl,
            *self._identity(), self._last_seen.get(stream, "0-0"),
        )  # fmt: skip
        commands = [*leading, self._fetch_command(queue, consumer, block_seconds), started]
        large = any(isinstance(a, bytes) and len(a) >= _LARGE_BYTES for c in leading for a in c)
        replies = self._run(commands, block_seconds=block_seconds, raise_errors=False, large=large)
        if any(isinstance(r, NoScriptError) for r in replies):
            # A restarted server forgot the scripts: nothing they do happened. Run them
            # again now that they are loaded (the read itself did happen).
            self._load_scripts()
            for position, reply in enumerate(replies):
                if isinstance(reply, NoScriptError):
                    replies[position] = self._run([commands[position]], raise_errors=False)[0]
        if any(isinstance(r, ResponseError) and "NOGROUP" in str(r) for r in replies[-2:]):
            with self._queues_may_be_gone([queue]):
                raise replies[-2] if isinstance(replies[-2], ResponseError) else replies[-1]
            replies[-2:] = [None, None]  # the caller simply fetches again
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise reply
        read, verdict = replies[-2], replies[-1]
        if not read:
            return None
        entry_id, fields = read[0][1][0]
        delivery = _delivery(queue, entry_id, fields)
        self._last_seen[stream] = delivery.delivery_id
        if verdict and verdict[0] == entry_id:
            delivery = _with_verdict(delivery, verdict[1])
        return delivery

    def _recover_lost_read(self, queues: Sequence[str], consumer: str) -> Delivery | None:
        """A delivery given to ``consumer`` by a read whose reply was lost, if any.

        A connection that dies while a read is being served loses the entry the read
        delivered: it waits in the consumer's pending list, which nothing else looks at
        while the worker lives (its supervisor renews the lease). So after any connection
        error the next fetch looks there first, until it finds nothing.
        """
        keys = [self.queue_key(queue) for queue in queues]
        reply = None
        with self._queues_may_be_gone(queues):
            reply = self._recover(
                keys=keys, args=[GROUP, consumer, self.record_key(""), self._ttl, *self._identity()]
            )
        if not reply:
            self._local.read_lost = False
            return None
        index, entry_id, fields, verdict = reply
        delivery = _with_verdict(_delivery(queues[int(index) - 1], entry_id, fields), verdict)
        log.warning("took back entry %s of queue %s, delivered while the connection was lost",
                    delivery.delivery_id, delivery.queue)  # fmt: skip
        return delivery

    def _fetch_many(
        self, queues: Sequence[str], consumer: str, block_seconds: float
    ) -> Delivery | None:
        keys = [self.queue_key(q) for q in queues]
        deadline = time.monotonic() + block_seconds
        args = (GROUP, consumer, self.record_key(""), self._ttl, *self._identity())
        while True:
            index, *rest = self._run_scripts([self._evalsha("fetch", keys, *args)])[0]
            if index:
                return _with_verdict(_delivery(queues[index - 1], rest[0], rest[1]), rest[2])
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            command = ("XREAD", "COUNT", 1, "BLOCK", max(1, int(remaining * 1000)), "STREAMS",
                       *keys, *rest[0])  # fmt: skip
            self._run([command], block_seconds=remaining)

    def _identity(self) -> tuple[str, int]:
        # Who marks tasks STARTED: this host and process (children call this after fork,
        # so the cache is keyed by pid).
        pid = os.getpid()
        if self._whoami[1] != pid:
            self._whoami = (socket.gethostname(), pid)
        return self._whoami

    def _load_scripts(self) -> None:
        for body in self._scripts.values():
            self.redis.script_load(body)

    def start(self, task_id: str, record: Mapping[str, str]) -> str | None:
        """Mark STARTED unless the task must not run; then return the state that forbids it.

        Deliveries from :meth:`fetch` already carry this verdict; this is for the rest.
        """
        command = self._evalsha(
            "start", [], task_id, self.record_key(""), self._ttl,
            record.get("worker", ""), record.get("pid", ""),
        )  # fmt: skip
        with self.translate_errors():
            (reply,) = self._run_scripts([command])
        verdict = bytes(reply).decode()
        return None if verdict == "OK" else verdict

    def emit(self, channel: str, raw_events: Sequence[bytes]) -> None:
        """Append events to a client's channel in one round trip."""
        with self.translate_errors():
            self._run([self._xadd_event(channel, raw) for raw in raw_events])

    def _xadd_event(self, channel: str, raw: bytes) -> tuple[Any, ...]:
        return ("XADD", channel, "MAXLEN", "~", CHANNEL_MAXLEN, "*", "e", raw)

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
        """Store the record, send the event, park ``requeue`` until its due time, and ack.

        All in one atomic step. An empty ``record`` deletes the task's record; an empty
        ``raw_event`` sends nothing and leaves the record alone. ``then_fetch`` =
        ``(queues, consumer, block_seconds)`` also waits for the next message in the same
        round trip (one queue only) and returns it.
        """
        fields = [
            part
            for key, value in record.items()
            for part in (key, b"=event" if value is raw_event and raw_event else value)
        ]
        queue = delivery.queue if delivery is not None else ""
        keys = (self.record_key(task_id), channel, self.queue_key(queue), self.eta_key(queue))
        later, due = requeue if requeue is not None else (b"", 0.0)
        if later:
            later = task_id.encode() + b":" + later  # the ETA set's member format
        entry = delivery.delivery_id if delivery is not None else ""
        command = self._evalsha(
            "finish", keys, self._ttl, CHANNEL_MAXLEN, raw_event, entry, later, repr(due), *fields
        )
        read_lost = getattr(self._local, "read_lost", False)  # fetch() recovers that first
        if then_fetch is None or len(then_fetch[0]) != 1 or read_lost:
            with self.translate_errors():
                self._run_scripts([command], large=len(raw_event) >= _LARGE_BYTES)
            return None
        queues, consumer, block_seconds = then_fetch
        with self.translate_errors():
            return self._read_one(queues[0], consumer, block_seconds, [command])

    def _fetch_command(self, queue: str, consumer: str, block_seconds: float) -> tuple[Any, ...]:
        block = max(1, int(block_seconds * 1000))
        return ("XREADGROUP", "GROUP", GROUP, consumer, "COUNT", 1, "BLOCK", block,
                "STREAMS", self.queue_key(queue), ">")  # fmt: skip

    def forget_unsent(self, task_id: str) -> None:
        """Delete a record that only a start check wrote (it names no client)."""
        with self.translate_errors():
            self._forget(keys=[self.record_key(task_id)])

    def rate_wait(self, bucket: str, rate: float) -> float:
        """Take the token of ``bucket`` (``rate`` per second) or say how long to wait."""
        command = self._evalsha(
            "rate", [f"{self._prefix}:rate:{bucket}"], repr(rate), repr(time.time())
        )
        with self.translate_errors():
            (reply,) = self._run_scripts([command])
        return float(reply)

    def send_control(self, raw: bytes) -> None:
        """Broadcast a signed control message (e.g. terminate) to every worker."""
        with self.translate_errors():
            self._run([("XADD", self._control_key, "MAXLEN", "~", 1000, "*", "e", raw)])

    def read_control(self, after: str) -> list[tuple[str, bytes]]:
        """Control messages after entry ``after`` (``"$"``: from now on), without waiting."""
        if after == "$":
            with self.translate_errors():
                (last,) = self._run([("XREVRANGE", self._control_key, "+", "-", "COUNT", 1)])
            return [(last[0][0].decode() if last else "0-0", b"")]
        with self.translate_errors():
            (reply,) = self._run([("XREAD", "COUNT", 100, "STREAMS", self._control_key, after)])
        out = []
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                out.append((entry_id.decode(), fields[1] if len(fields) >= 2 else b""))
        return out

    @property
    def _control_key(self) -> str:
        return f"{self._prefix}:control"

    def discard(self, delivery: Delivery) -> None:
        """Acknowledge and delete a delivery that must not run."""
        stream = self.queue_key(delivery.queue)
        with self.translate_errors():
            self._run(
                [
                    ("XACK", stream, GROUP, delivery.delivery_id),
                    ("XDEL", stream, delivery.delivery_id),
                ]
            )

    def requeue(self, delivery: Delivery, task_id: str) -> None:
        """Re-add the message with its redelivery count raised, and drop the old entry."""
        stream = self.queue_key(delivery.queue)
        with self.translate_errors(), self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(stream, {"e": delivery.raw, "n": delivery.deliveries + 1, "i": task_id})
            pipe.hset(self.record_key(task_id), "state", "PENDING")
            pipe.xack(stream, GROUP, delivery.delivery_id)
            pipe.xdel(stream, delivery.delivery_id)
            pipe.execute()

    def dead_letter(self, delivery: Delivery) -> None:
        """Move the message to the dead-letter stream and acknowledge it."""
        stream = self.queue_key(delivery.queue)
        with self.translate_errors(), self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(
                self.dead_letter_key,
                {"e": delivery.raw, "q": delivery.queue, "n": delivery.deliveries},
                maxlen=CHANNEL_MAXLEN,
                approximate=True,
            )
            pipe.xack(stream, GROUP, delivery.delivery_id)
            pipe.xdel(stream, delivery.delivery_id)
            pipe.execute()

    def pending_of(
        self, queues: Sequence[str], consumer: str, min_idle: float = 0.0
    ) -> list[Delivery]:
        """Claim and return the deliveries ``consumer`` holds unacknowledged.

        ``min_idle`` (seconds) leaves out entries whose lease was renewed more recently:
        a worker that only looked dead (paused, slow) keeps what it is running.
        """
        out: list[Delivery] = []
        idle = int(min_idle * 1000) or None
        with self.translate_errors(), self._queues_may_be_gone(queues):
            for queue in queues:
                stream = self.queue_key(queue)
                pending = self.redis.xpending_range(
                    stream, GROUP, "-", "+", 1000, consumer, idle=idle
                )
                ids = [p["message_id"] for p in pending]
                if ids:
                    out += self._claim(queue, consumer, ids)
        return out

    def _claim(self, queue: str, consumer: str, ids: list[Any]) -> list[Delivery]:
        stream = self.queue_key(queue)
        claimed = self.redis.xclaim(stream, GROUP, consumer, 0, ids)
        out = []
        for entry_id, fields in claimed:
            if fields:  # None when the entry was deleted meanwhile
                out.append(_delivery(queue, entry_id, fields))
            else:
                self.redis.xack(stream, GROUP, entry_id)
        return out

    def heartbeat(
        self, worker_id: str, info: str, consumers: Sequence[str], queues: Sequence[str]
    ) -> None:
        """Refresh the worker's presence and reset the idle time of its pending entries."""
        ttl_ms = int(3 * self.settings.heartbeat_interval * 1000)
        with self.translate_errors():
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(self._hb_key(worker_id), info, px=ttl_ms)
            pipe.hset(self._workers_key, worker_id, info)
            pipe.execute()
        with self.translate_errors(), self._queues_may_be_gone(queues):
            for queue in queues:
                stream = self.queue_key(queue)
                for consumer in consumers:
                    pending = self.redis.xpending_range(stream, GROUP, "-", "+", 1000, consumer)
                    ids = [p["message_id"] for p in pending]
                    if ids:
                        # Re-claiming to the same consumer resets the entry's idle time:
                        # the lease renewal that keeps long tasks from being reclaimed.
                        self.redis.xclaim(stream, GROUP, consumer, 0, ids, justid=True)

    def unregister(self, worker_id: str, consumers: Sequence[str], queues: Sequence[str]) -> None:
        """Forget a worker and delete its (idle) consumers."""
        with self.translate_errors():
            pipe = self.redis.pipeline(transaction=False)
            pipe.delete(self._hb_key(worker_id))
            pipe.hdel(self._workers_key, worker_id)
            for queue in queues:
                for consumer in consumers:
                    pipe.xgroup_delconsumer(self.queue_key(queue), GROUP, consumer)
            with contextlib.suppress(ResponseError):
                pipe.execute()

    def workers(self) -> dict[str, str]:
        """Workers whose heartbeat is current."""
        return self._registered(alive=True)

    def dead_workers(self) -> dict[str, str]:
        """Registered workers whose heartbeat key has expired."""
        return self._registered(alive=False)

    def _registered(self, *, alive: bool) -> dict[str, str]:
        with self.translate_errors():
            registered: dict[bytes, bytes] = self.redis.hgetall(self._workers_key)
            ids = list(registered)
            beats = self.redis.mget([self._hb_key(w.decode()) for w in ids]) if ids else []
        return {
            w.decode(): registered[w].decode()
            for w, beat in zip(ids, beats, strict=True)
            if bool(beat) is alive
        }

    def claim_dead_worker(self, worker_id: str) -> bool:
        """Win the right to clean up ``worker_id`` for the next two heartbeats."""
        with self.translate_errors():
            lock = f"{self._prefix}:reclaim:{worker_id}"
            hold_ms = max(100, int(2000 * self.settings.heartbeat_interval))
            return bool(self.redis.set(lock, b"1", nx=True, px=hold_ms))

    def holds_pending(self, queues: Sequence[str], consumers: Sequence[str]) -> bool:
        """True if any of ``consumers`` still holds an unacknowledged delivery."""
        with self.translate_errors(), self._queues_may_be_gone(queues):
            for queue in queues:
                summary = self.redis.xpending(self.queue_key(queue), GROUP)
                holders = {c["name"].decode() for c in summary.get("consumers", [])}
                if holders & set(consumers):
                    return True
        return False

    def stale_deliveries(self, queues: Sequence[str], consumer: str) -> list[Delivery]:
        """Claim entries nobody renewed for ``visibility_timeout`` (a backstop)."""
        min_idle = int(self.settings.visibility_timeout * 1000)
        out: list[Delivery] = []
        with self.translate_errors(), self._queues_may_be_gone(queues):
            for queue in queues:
                cursor = "0-0"
                while True:  # the whole pending list, a hundred entries at a time
                    reply = self.redis.xautoclaim(
                        self.queue_key(queue), GROUP, consumer, min_idle, cursor, count=100
                    )
                    for entry_id, fields in reply[1]:
                        if fields:
                            out.append(_delivery(queue, entry_id, fields))
                    cursor = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
                    if cursor == "0-0":
                        break
        return out

    def move_due(self, queues: Sequence[str]) -> float | None:
        """Move due ETA messages to their streams; return the next due time."""
        keys: list[str] = []
        for queue in queues:
            keys += [self.eta_key(queue), self.queue_key(queue)]
        with self.translate_errors():
            nxt = self._move_due(keys=keys, args=[repr(time.time())])
        return float(nxt) if nxt else None

    def forget_worker(self, worker_id: str) -> None:
        """Drop a dead worker from the registry once its deliveries are handled."""
        with self.translate_errors():
            self.redis.hdel(self._workers_key, worker_id)


def _pack(commands: Sequence[tuple[Any, ...]]) -> list[bytes]:
    """RESP-encode ``commands``; large arguments are sent as they are, never copied.

    (redis-py with hiredis packs everything into one buffer: for a 50 MB argument that
    copy costs more than sending it.)
    """
    chunks: list[bytes] = []
    for command in commands:
        head = [b"*%d\r\n" % len(command)]
        for arg in command:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            if len(data) >= _LARGE_BYTES:
                chunks += [b"".join((*head, b"$%d\r\n" % len(data))), data]
                head = [b"\r\n"]
            else:
                head.append(b"$%d\r\n%s\r\n" % (len(data), data))
        chunks.append(b"".join(head))
    return chunks


def _with_verdict(delivery: Delivery, verdict: bytes) -> Delivery:
    # NOID: an entry without the plain task id (not written by nbtask's publish): the
    # worker asks start() itself once it has read the signed header.
    text = verdict.decode()
    return delivery if text == "NOID" else dataclasses.replace(delivery, verdict=text)


def _delivery(queue: str, entry_id: bytes | str, fields: Any) -> Delivery:
    if isinstance(fields, list):  # raw reply: a flat [k, v, k, v] list
        fields = dict(zip(fields[::2], fields[1::2], strict=False))
    entry = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    task_id = fields.get(b"i")
    return Delivery(
        queue, entry, fields.get(b"e", b""), int(fields.get(b"n", 0)),
        task_id=task_id.decode(errors="replace") if task_id else None,
    )  # fmt: skip
