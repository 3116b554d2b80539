"""The Redis Streams transport: one Stream per queue with a consumer group.

It shares its server with the Redis store, so each step of a task is one round trip: the
PENDING record is written with the message, the start check runs the moment a blocking
read is served, and the final record, the client's event and the acknowledgement go in
one script.

Delivery rules (see the README's "Delivery semantics"):

* A message stays in the group's pending list from delivery until the worker finishes,
  whatever the task's ``acks_late``; the supervisor renews the lease of every pending
  entry its children hold at each heartbeat, so a running task is never redelivered.
* When a child or a whole worker dies, its pending entries are handled by the supervisor
  (or by any live worker once the dead worker's heartbeat lapses): ``acks_late`` messages
  are put back, others are reported ``WORKER_LOST``.
* ETA messages wait in the store's ``<prefix>:eta:<queue>`` and are moved to the stream
  when due, so no worker ever holds one unacknowledged.
* A read whose reply is lost with its connection may still have delivered an entry (and
  marked its task STARTED): after any connection error the consumer's next fetch takes
  such an entry back from its own pending list before it reads new ones.
* A last write that Redis refuses (full, read-only...) while the read sent with it
  delivered the next entry keeps that entry: the task's next successful last write, or
  the next fetch, returns it, so it is handled even by a child asked to stop meanwhile.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

from nbtask._process import current_pid
from nbtask.brokers.base import OWED_SECONDS
from nbtask.brokers.handoffs import Delivery, Publish, Settlement, Verdict
from nbtask.brokers.redis_link import LARGE_BYTES, Command
from nbtask.brokers.redis_moves import StreamsMoves
from nbtask.brokers.redis_owed import looking, unanswered
from nbtask.brokers.redis_queued import QUEUED_SCRIPTS, still_queued
from nbtask.brokers.redis_resp import as_text
from nbtask.brokers.redis_store import RedisStore
from nbtask.brokers.redis_upkeep import GROUP, _delivery
from nbtask.brokers.refused_ends import refused_by
from nbtask.brokers.streams_scripts import STREAMS_SCRIPTS
from nbtask.errors import BrokerUnavailable

log = logging.getLogger(__name__)

__all__ = ["GROUP", "StreamsTransport"]


class StreamsTransport(StreamsMoves):
    """A :class:`~nbtask.brokers.base.Transport` on Redis Streams, beside its store.

    Parameters
    ----------
    store
        The Redis store on the same server.
    """

    #: A client's channel is a stream read from given positions, on any connection.
    events_from_any_thread = True
    #: Queues and records are keys of one Redis: a restart without persistence loses both.
    queues_beside_records = True

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self.link = store.link
        self.settings = store.settings
        self._last_seen: dict[str, str] = {}
        self._whoami: tuple[str, int] = ("", -1)
        # A fetch's read and start check, by (queue, consumer, block, pid): made once.
        self._reads: dict[tuple[str, str, int, int], tuple[str, Command, Command]] = {}
        # An entry a refused last write's read delivered, by that task's id (see finish).
        self._kept: tuple[str, Delivery] | None = None
        self.link.add_scripts(STREAMS_SCRIPTS)
        self.link.add_scripts(QUEUED_SCRIPTS)

    def ping(self) -> None:
        """Raise :class:`~nbtask.errors.BrokerUnavailable` unless the server answers."""
        self.link.ping()

    def close(self) -> None:
        """Close the server's connections."""
        self.link.close()

    def answers_within(self, seconds: float) -> contextlib.AbstractContextManager[None]:
        """In the block, this thread gives up on an answer Redis owes after ``seconds``.

        It raises :class:`~nbtask.errors.BrokerUnavailable` then, and at once for every
        later command of the block (see
        :meth:`~nbtask.brokers.redis_link.RedisLink.answering_within`).
        """
        return self.link.answering_within(seconds)

    # Client side -----------------------------------------------------------------------------
    def publish(self, messages: Sequence[Publish], *, wait: bool = True) -> list[str]:
        """Enqueue messages and write their PENDING records, in one round trip.

        With ``wait`` (or several messages, or a large one) Redis has answered when this
        returns. Without, a lone message is written and Redis's reply is read later, by
        this thread's next command or :meth:`flush`; its refusal is then not reported,
        so the caller must know its task id to be new (one it made itself).
        """
        now = time.time()
        if (msg := unanswered(messages, wait)) is not None:
            with self.link.translate_errors():
                # Its sender made the id itself: no task can hold it, nothing to look up
                # (unless it is sent again: the first copy may have run).
                command = self._publish_command(msg, now, new=True)
                self.link.send_unanswered(command, msg.task_id, again=looking(command))
            return [""]
        commands: list[Command] = []
        large = False
        for msg in messages:
            if len(msg.raw) < LARGE_BYTES:
                commands.append(self._publish_command(msg, now))
                continue
            # A large message skips the script: a script argument is one more copy of it
            # inside Redis. The record is written by the same shared step, and MULTI
            # keeps it all-or-nothing; if another task already holds the id the message
            # is still queued, and the start check drops it (that task is running or
            # ended), or only one of the two copies runs (it is queued).
            large = True
            due = _due(msg, now)
            if due is None:
                queue_it: Command = (
                    "XADD",
                    self.queue_key(msg.queue),
                    "*",
                    "e",
                    msg.raw,
                    "n",
                    0,
                    "i",
                    msg.task_id,
                )
            else:
                queue_it = (
                    "ZADD",
                    self.store.eta_key(msg.queue),
                    repr(due),
                    msg.task_id.encode() + b":" + msg.raw,
                )
            record = self.store.pending_command(msg.task_id, msg.queue, msg.record)
            # Room for the ETA set (a key of another type there is replaced).
            room = self.link.evalsha("set_aside", [self.store.eta_key(msg.queue)])
            commands += [("MULTI",), record, room, queue_it, ("EXEC",)]
        with self.link.translate_errors():
            replies = self.link.run_scripts(commands, large=large)
        return _refusals(replies)

    def _publish_command(self, msg: Publish, now: float, *, new: bool = False) -> Command:
        store, record = self._store, msg.record
        client = record.get("client")
        index = store.client_tasks_key(str(client)) if client else ""
        keys = (
            self.queue_key(msg.queue),
            store.eta_key(msg.queue),
            store.record_key(msg.task_id),
            index,
        )
        return self.link.evalsha(
            "publish",
            keys,
            msg.raw,
            store.ttl,
            "" if (due := _due(msg, now)) is None else repr(due),
            msg.task_id,
            repr(now),
            store.index_upkeep(index),
            "1" if new else "0",
            *itertools.chain.from_iterable(record.items()),
        )

    def flush(self) -> None:
        """Read Redis's replies to this thread's publishes sent without waiting.

        And those of threads that ended (see :meth:`RedisLink.settle_ended`).
        """
        with self.link.translate_errors():
            self.link.settle_ended()
            self.link.settle_owed()

    def settle_every_thread(self) -> None:
        """Before closing: read the replies other threads owe, :data:`OWED_SECONDS` at most.

        Tasks Redis did not answer for by then are noted for :meth:`take_unsent` (the app
        revokes them); see :meth:`~nbtask.brokers.redis_owing.OwedReplies.settle_others`.
        Never raises :class:`~nbtask.errors.BrokerUnavailable`.
        """
        with contextlib.suppress(BrokerUnavailable), self.link.translate_errors():
            self.link.settle_others(OWED_SECONDS)

    def sends_in_doubt(self) -> set[str]:
        """Ids of tasks published without waiting whose replies are not read yet."""
        return self.link.in_doubt()

    def take_unsent(self) -> list[str]:
        """Ids of tasks published without waiting that Redis never queued."""
        return self.link.take_unsent()

    def read_events(
        self, channels: Mapping[str, str], block_seconds: float
    ) -> list[tuple[str, str, bytes]]:
        """Block on client channels (streams in the store)."""
        return self.store.read_events(channels, block_seconds)

    def still_queued(self, queues: Mapping[str, Collection[str]]) -> set[str]:
        """Which of the task ids given per queue still have a message there (a scan).

        In its stream (held by a worker or not) or its ETA set: see
        :mod:`~nbtask.brokers.redis_queued`.
        """
        keys = {q: (self.store.eta_key(q), self.queue_key(q)) for q in queues}
        return still_queued(self.link, keys, queues)

    def events_lost(self, channel: str, after: str) -> bool:
        """Whether events of ``channel`` after entry ``after`` were trimmed unread."""
        return self.store.trimmed_after(channel, after)

    def wake(self, channel: str) -> None:
        """Make a reader blocked on ``channel`` return at once."""
        self.store.wake(channel)

    def keep_channel(self, channel: str) -> None:
        """Keep a live client's channel."""
        self.store.keep_channel(channel)

    def notify(
        self, channel: str, raw_events: Sequence[bytes], *, entries: Sequence[str] = ()
    ) -> None:
        """Nothing to do: the store's stream is the channel its client reads."""

    def event_verified(self, channel: str, entry_id: str) -> None:
        """Nothing to do: a client's position is the last entry it read of the stream."""

    def purge(self, queues: Sequence[str]) -> list[str]:
        """Delete the messages waiting on ``queues`` (ETA ones too); their task ids."""
        keys = [k for q in queues for k in (self.queue_key(q), self.store.eta_key(q))]
        reply = self.link.call("purge", keys, GROUP)
        return [raw.decode("utf-8", "replace") for raw in reply]

    # Worker side -----------------------------------------------------------------------------
    def emit(self, channel: str, raw_events: Sequence[bytes]) -> None:
        """Append events to a client's channel, in one round trip."""
        self.store.append_events(channel, raw_events)

    def fetch(self, queues: Sequence[str], consumer: str, block_seconds: float) -> Delivery | None:
        """Take one message, waiting up to ``block_seconds``; never more than one.

        The delivery comes with its start verdict (``Delivery.verdict``), decided by
        Redis in the same round trip.
        """
        if self._kept is not None:  # delivered by a read beside a refused last write
            kept, self._kept = self._kept[1], None
            return kept
        with self.link.translate_errors():
            if self.link.read_lost:
                recovered = self._recover_lost_read(queues, consumer)
                if recovered is not None:
                    return recovered
            if len(queues) == 1:
                return self._read_one(queues[0], consumer, block_seconds, ())
            with self._queues_may_be_gone(queues):
                return self._fetch_many(queues, consumer, block_seconds)
            return None

    def _start_args(self, consumer: str) -> tuple[Any, ...]:
        # ARGV shared by the fetching scripts: group, consumer, record key prefix, ttl,
        # worker, pid.
        host, pid = self._identity()
        return (GROUP, consumer, self.store.record_key(""), self.store.ttl, host, pid)

    def _read_one(
        self,
        queue: str,
        consumer: str,
        block_seconds: float,
        leading: Sequence[Command],
        *,
        large: bool = False,
        end: Settlement | None = None,
    ) -> Delivery | None:
        # One write: [leading commands,] a blocking read, and the start check that Redis
        # runs as soon as the read is served. One queue: the server hands each entry to
        # exactly one blocked consumer. ``end``: the task's end the leading command (the
        # finish script) stores.
        task_id = end.task_id if end is not None else ""
        stream, read, check = self._read_commands(queue, consumer, block_seconds)
        commands = [*leading, read, (*check, self._last_seen.get(stream, "0-0"))]
        replies = self.link.run(
            commands, block_seconds=block_seconds, raise_errors=False, large=large
        )
        for reply in replies:  # (a loop, not any() over a generator: on every task)
            if isinstance(reply, ResponseError):
                break
        else:
            if end is not None:
                refused_by(end, replies[0])
            return self._delivered(queue, stream, replies[-2], replies[-1])
        # Rare: looked at apart. Whatever the read delivered is handled, whatever failed.
        replies = self._mended(queue, commands, replies)
        entries, verdict = replies[-2], replies[-1]
        delivery = None
        if not isinstance(entries, ResponseError):
            # A refused start check did not run: the worker asks the store.
            checked = None if isinstance(verdict, ResponseError) else verdict
            delivery = self._delivered(queue, stream, entries, checked)
        failed = next((r for r in replies[: len(leading)] if isinstance(r, ResponseError)), None)
        if failed is not None:
            if delivery is not None:  # for the task's next last write, or the next fetch
                self._kept = (task_id, delivery)
            raise failed
        if end is not None:
            refused_by(end, replies[0])
        if isinstance(entries, ResponseError):
            if not leading:
                raise entries
            # What came before it is done (a task's last write): not this task's failure.
            # The next fetch reads again, and says what fails.
            log.info("could not take the next message after task %s: %s", task_id, entries)
        return delivery

    def _delivered(self, queue: str, stream: str, entries: Any, verdict: Any) -> Delivery | None:
        """The delivery a blocking read's reply holds, if any, with its start verdict."""
        if not entries:
            return None
        entry_id, fields = entries[0][1][0]
        # The start check looked at this very entry (else the worker asks the store).
        checked = _verdict(verdict[1]) if verdict and verdict[0] == entry_id else None
        delivery = _delivery(queue, entry_id, fields, checked)
        self._last_seen[stream] = delivery.delivery_id
        return delivery

    def _read_commands(
        self, queue: str, consumer: str, block_seconds: float
    ) -> tuple[str, Command, Command]:
        """The stream, its blocking read, and its start check less the last entry seen."""
        block = max(1, int(block_seconds * 1000))
        key = (queue, consumer, block, self._identity()[1])
        made = self._reads.get(key)
        if made is None:
            if len(self._reads) >= 64:  # (a child asks for one or two; stay small anyway)
                self._reads.clear()
            stream = self.queue_key(queue)
            read = ("XREADGROUP", "GROUP", GROUP, consumer, "COUNT", 1, "BLOCK", block)
            check = self.link.evalsha("started", [stream], *self._start_args(consumer))
            # Numbers written out once, not on every task's read.
            made = (stream, as_text((*read, "STREAMS", stream, ">")), as_text(check))
            self._reads[key] = made
        return made

    def _mended(self, queue: str, commands: Sequence[Command], replies: list[Any]) -> list[Any]:
        """The replies of a fetch that met errors, once what can be mended is.

        A read from a queue that is gone raises (see ``_queues_may_be_gone``), or reads
        as nothing; other errors stay in their places.
        """
        if any(isinstance(r, NoScriptError) for r in replies):
            # A restarted server forgot the scripts: nothing they do happened. Run them
            # again now that they are loaded (the read itself did happen).
            self.link.load_scripts()
            for position, reply in enumerate(replies):
                if isinstance(reply, NoScriptError):
                    replies[position] = self.link.run([commands[position]], raise_errors=False)[0]
        if any(isinstance(r, ResponseError) and "NOGROUP" in str(r) for r in replies[-2:]):
            with self._queues_may_be_gone([queue]):
                raise replies[-2] if isinstance(replies[-2], ResponseError) else replies[-1]
            replies[-2:] = [None, None]  # the caller simply fetches again
        return replies

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
            reply = self.link.run_scripts(
                [self.link.evalsha("recover", keys, *self._start_args(consumer))]
            )[0]
        if not reply:
            self.link.read_lost = False
            return None
        index, entry_id, fields, verdict = reply
        delivery = _delivery(queues[int(index) - 1], entry_id, fields, _verdict(verdict))
        log.warning(
            "took back entry %s of queue %s, delivered while the connection was lost",
            delivery.delivery_id,
            delivery.queue,
        )
        return delivery

    def _fetch_many(
        self, queues: Sequence[str], consumer: str, block_seconds: float
    ) -> Delivery | None:
        keys = [self.queue_key(q) for q in queues]
        deadline = time.monotonic() + block_seconds
        fetch = self.link.evalsha("fetch", keys, *self._start_args(consumer))
        while True:
            index, *rest = self.link.run_scripts([fetch])[0]
            if index:
                return _delivery(queues[index - 1], rest[0], rest[1], _verdict(rest[2]))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            block = max(1, int(remaining * 1000))
            self.link.run(
                [("XREAD", "COUNT", 1, "BLOCK", block, "STREAMS", *keys, *rest[0])],
                block_seconds=remaining,
            )

    def _identity(self) -> tuple[str, int]:
        # Who marks tasks STARTED: this host and process (children call this after fork,
        # so the cache is keyed by pid; current_pid: no system call, on every task).
        pid = current_pid()
        if self._whoami[1] != pid:
            self._whoami = (socket.gethostname(), pid)
        return self._whoami

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
        """Store the record, send the event, park ``requeue`` until its due time, and ack.

        All in one atomic step. An empty ``fields`` deletes the task's record; an empty
        ``raw_event`` sends nothing. ``then_fetch`` = ``(queues, consumer,
        block_seconds)`` also waits for the next message in the same round trip (one
        queue only) and returns it.
        """
        queue = delivery.queue if delivery is not None else ""
        end = Settlement(
            task_id, channel, raw_event, fields, queue, later=requeue, later_queue=requeue_queue
        )
        (record, channel_key, eta), (ttl, maxlen, event, member, due, *rest) = (
            self.store.settle_args(end)
        )
        # The store's settle, with the stream entry to acknowledge added.
        entry = delivery.delivery_id if delivery is not None else ""
        keys = (record, channel_key, self.queue_key(queue), eta)
        command = self.link.evalsha("finish", keys, ttl, maxlen, event, entry, member, due, *rest)
        large = len(raw_event) >= LARGE_BYTES
        kept = self._kept
        if then_fetch is None or len(then_fetch[0]) != 1 or self.link.read_lost or kept is not None:
            with self.link.translate_errors():
                refused_by(end, self.link.run_scripts([command], large=large)[0])
            if kept is not None and kept[0] == task_id:
                # Taken by this task's last write that Redis refused: handled now.
                self._kept = None
                return kept[1]
            return None
        queues, consumer, block_seconds = then_fetch
        with self.link.translate_errors():
            return self._read_one(
                queues[0], consumer, block_seconds, [command], large=large, end=end
            )


def _due(msg: Publish, now: float) -> float | None:
    """When ``msg`` may run, if later than ``now``."""
    return None if msg.eta is None or msg.eta <= now else msg.eta


def _refusals(replies: Sequence[Any]) -> list[str]:
    """Per message, ``""`` or the state that refused it, from publish's replies."""
    out: list[str] = []
    for reply in replies:
        if reply in (b"OK", b"QUEUED", "OK", "QUEUED"):
            continue  # MULTI and the commands it queued
        value = reply[0] if isinstance(reply, list) else reply  # EXEC: the record's reply
        out.append(value.decode() if isinstance(value, bytes) else str(value or ""))
    return out


def _verdict(verdict: bytes) -> str | None:
    """A start check's reply as a delivery's verdict (``None``: ask the store)."""
    text = verdict.decode()
    return None if text == Verdict.ASK else text
