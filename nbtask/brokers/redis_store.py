"""The result store, on Redis: task records, client channels, control, ETA, rate limits.

Keys, all under ``<key_prefix>:``:

* ``r:<task id>``: a task's record (a hash), kept ``result_ttl``.
* ``c:<client id>``: a client's event channel (a stream), kept while the client lives
  and ``result_ttl`` after (:mod:`nbtask.brokers.redis_channels`).
* ``client-tasks:<client id>`` and ``client-group:<group>``: what a client sent, and a
  notebook's clients across kernel restarts (for re-attaching).
* ``eta:<queue>``: messages waiting for their due time (a sorted set), and ``dead``:
  messages given up on (a stream) (:mod:`nbtask.brokers.redis_parked`).
* ``control``: signed control messages to every worker (a stream).
* ``workers``, ``hb:<worker id>``, ``versions:<worker id>``: the worker registry
  (:mod:`nbtask.brokers.redis_workers`).
* ``log:<task id>``: what workers said about a task (its journal).
* ``rate:<bucket>``: rate-limit buckets (and their ``:schedule`` and ``:given`` starts).
* ``blob:<digest>:<n>``: large values sent out of band, and ``blobref:<digest>`` the uses
  of each (:mod:`nbtask.brokers.redis_blobs`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from redis.exceptions import ResponseError

from nbtask.brokers import journals
from nbtask.brokers.blob_scripts import BLOB_SCRIPTS
from nbtask.brokers.bounded_reads import BOUNDED_SCRIPTS, read_bounded, read_record, read_records
from nbtask.brokers.eta_scripts import ETA_SCRIPTS
from nbtask.brokers.follow_up_scripts import FOLLOW_UP_SCRIPTS
from nbtask.brokers.handoffs import Publish, Settlement, StartBy
from nbtask.brokers.journals import JOURNAL_SCRIPTS
from nbtask.brokers.local_blobs import LocalBlobs
from nbtask.brokers.lost_scripts import LOST_SCRIPTS
from nbtask.brokers.rate_scripts import RATE_SCRIPTS
from nbtask.brokers.redis_blobs import RedisBlobs
from nbtask.brokers.redis_channels import CHANNEL_MAXLEN, CHANNEL_SCRIPTS, entry_text, event_of
from nbtask.brokers.redis_errors import is_wrong_type
from nbtask.brokers.redis_holdings import RedisHoldings
from nbtask.brokers.redis_link import LARGE_BYTES, RedisLink
from nbtask.brokers.redis_owed import unanswered
from nbtask.brokers.redis_parked import DEAD_LETTER_BYTES, RedisParked, log_set_aside
from nbtask.brokers.redis_workers import WORKER_SCRIPTS, RedisWorkers
from nbtask.brokers.refused_ends import refused_by
from nbtask.brokers.scripts import EXPIRY_UPKEEP_SECONDS, INDEX_UPKEEP_SECONDS, STORE_SCRIPTS
from nbtask.settings import Settings
from nbtask.wire.events import FINAL_STATE_NAMES
from nbtask.wire.records import MAX_REVOKE_BYTES, RecordFields, TaskRecord

__all__ = ["DEAD_LETTER_BYTES", "RedisStore"]

log = logging.getLogger(__name__)


#: A control entry id this far past the clock was not given by Redis (clocks of hosts
#: differ by far less).
_AHEAD_SECONDS = 86_400.0


class RedisStore(RedisWorkers, RedisBlobs, RedisHoldings, RedisParked):
    """A :class:`~nbtask.brokers.base.Store` on Redis.

    Parameters
    ----------
    link
        The server (shared with the Redis Streams transport on a Redis broker).
    settings
        Key prefix, TTLs, heartbeat interval.
    """

    #: Whether "the control stream is not a stream" was said and still holds (a worker
    #: reads it on every tick).
    _said_control = False

    def __init__(self, link: RedisLink, settings: Settings) -> None:
        self.link = link
        self.settings = settings
        self.prefix = settings.key_prefix
        self.ttl = int(settings.result_ttl)
        # A client index, channel or the ended-task set: when this process next trims it or
        # pushes its expiry back.
        self._upkeep_due: dict[str, float] = {}
        self.local_blobs = LocalBlobs.open(link.url, settings)
        self.max_event_bytes = settings.max_message_bytes
        link.add_scripts({**STORE_SCRIPTS, **ETA_SCRIPTS})
        link.add_scripts(FOLLOW_UP_SCRIPTS)
        link.add_scripts(LOST_SCRIPTS)
        link.add_scripts(RATE_SCRIPTS)
        link.add_scripts(CHANNEL_SCRIPTS)
        link.add_scripts(BLOB_SCRIPTS)
        link.add_scripts({**BOUNDED_SCRIPTS, **WORKER_SCRIPTS, **JOURNAL_SCRIPTS})

    # Keys ----------------------------------------------------------------------------------
    def record_key(self, task_id: str) -> str:
        """The hash holding a task's state and result."""
        return f"{self.prefix}:r:{task_id}"

    def client_tasks_key(self, channel: str) -> str:
        """The tasks a client sent, by send time (written at publish, for recent_tasks)."""
        return f"{self.prefix}:client-tasks:{channel.rsplit(':', 1)[-1]}"

    @property
    def done_key(self) -> str:
        """The sorted set of ended tasks (id by end time), kept for ``max_age``."""
        return f"{self.prefix}:done"

    def forget_ended_before(self, seconds: float) -> None:
        """Forget ended tasks older than ``seconds``: their messages are too old to run.

        A key of another type in the ended-task set's place is set aside (logged).
        """
        expiry = self.ttl + 2 * EXPIRY_UPKEEP_SECONDS  # (as a settle's: see WRITE_FINAL)
        if self.link.call("forget_ended", [self.done_key], repr(time.time() - seconds), expiry):
            log_set_aside(self.done_key, "the ended-task set")

    @property
    def control_key(self) -> str:
        """The stream of control messages to every worker."""
        return f"{self.prefix}:control"

    # Lifecycle -------------------------------------------------------------------------------
    def ping(self) -> None:
        """Raise :class:`~nbtask.errors.BrokerUnavailable` unless the store answers."""
        self.link.ping()

    def close(self) -> None:
        """Release connections."""
        self.link.close()

    def restarts_seen(self) -> int:
        """How many times a new connection found the server restarted (a new run id)."""
        return self.link.runs.restarts

    # Records ---------------------------------------------------------------------------------
    def get_record(self, task_id: str) -> TaskRecord | None:
        """The task's stored record; ``None`` if unknown or expired (see read_record)."""
        return read_record(self.link, self.record_key(task_id), self.max_event_bytes)

    def get_records(self, task_ids: Sequence[str]) -> dict[str, TaskRecord | None]:
        """Tasks' records by id, read in one round trip (see :meth:`get_record`)."""
        keys = [self.record_key(task_id) for task_id in task_ids]
        records = read_records(self.link, keys, self.max_event_bytes)
        return dict(zip(task_ids, records, strict=True))

    def task_ids_starting(self, start: str, limit: int) -> list[str]:
        """Up to ``limit`` ids of kept records that begin with ``start``, sorted.

        A walk over the whole keyspace (``SCAN``): for an id a user typed, not for sends.
        """
        pattern = _glob_escaped(self.record_key(start)) + "*"
        head = len(self.record_key(""))
        found: set[str] = set()
        with self.link.translate_errors():
            for key in self.link.redis.scan_iter(match=pattern, count=1000):
                found.add(key.decode("utf-8", "replace")[head:])
                if len(found) >= limit:
                    break
        return sorted(found)

    def pending_command(
        self,
        task_id: str,
        queue: str,
        fields: RecordFields,
        member: bytes = b"",
        due: float = 0.0,
        *,
        new: bool = False,
    ) -> tuple[Any, ...]:
        """The command writing a PENDING record (and parking ``member`` until ``due``).

        ``new``: the sender drew ``task_id`` itself just now, so no task holds it and the
        write need not look (its refusal would not be read anyway).
        """
        client = fields.get("client")
        index = self.client_tasks_key(str(client)) if client else ""
        keys = (self.record_key(task_id), self.eta_key(queue), index)
        now, upkeep = repr(time.time()), self.index_upkeep(index)
        args = (self.ttl, now, task_id, repr(due), member, upkeep, "1" if new else "0")
        return self.link.evalsha("record", keys, *args, *_flat(fields))

    def index_upkeep(self, index: str) -> str:
        """``"1"`` when this send is to trim ``index`` (a client's tasks), else ``"0"``.

        Once every :data:`~nbtask.brokers.scripts.INDEX_UPKEEP_SECONDS` per index: two
        commands less per send.
        """
        if not index:
            return "0"  # (no index: nothing to trim)
        return self._upkeep(index, INDEX_UPKEEP_SECONDS)

    def _upkeep(self, key: str, seconds: float) -> str:
        """``"1"`` if this process last kept ``key`` up ``seconds`` ago or more (now it does)."""
        now = time.monotonic()
        if now < self._upkeep_due.get(key, 0.0):
            return "0"
        if len(self._upkeep_due) >= 1024:  # a worker writes for many clients' keys
            self._upkeep_due.clear()
        self._upkeep_due[key] = now + seconds
        return "1"

    def write_pending(self, messages: Sequence[Publish], *, wait: bool = True) -> list[str]:
        """Write the PENDING records of ``messages`` (parking ETA ones), in one round trip.

        Returns, per message, ``""`` or the final state that refused it. Without ``wait``
        a lone message's record is written without waiting for Redis's reply (see
        :meth:`~nbtask.brokers.redis_link.RedisLink.send_unanswered`): its task id must be
        new. Sent again (its connection dropped, or Redis lost its scripts), it is written
        as new again: its message went apart and may have started already, so a look
        would refuse the record the start check made, which would never name its client.
        """
        now = time.time()
        if (msg := unanswered(messages, wait)) is not None:
            with self.link.translate_errors():
                command = self._pending_of(msg, now, new=True)
                self.link.send_unanswered(command, msg.task_id)
            return [""]
        commands = [self._pending_of(msg, now) for msg in messages]
        with self.link.translate_errors():
            replies = self.link.run_scripts(commands, large=True)
        return [r.decode() if isinstance(r, bytes) else str(r or "") for r in replies]

    def _pending_of(self, msg: Publish, now: float, *, new: bool = False) -> tuple[Any, ...]:
        parked = msg.eta is not None and msg.eta > now
        member = msg.task_id.encode() + b":" + msg.raw if parked else b""
        due = msg.eta if parked and msg.eta is not None else 0.0
        return self.pending_command(msg.task_id, msg.queue, msg.record, member, due, new=new)

    def start(
        self,
        task_id: str,
        by: StartBy,
        *,
        redelivered: bool = False,
        copy: tuple[int, int] | None = None,
        revoke: tuple[bytes, bool] | None = None,
    ) -> str:
        """The one start check: ``"OK"`` (now STARTED) or the state that forbids a start."""
        vetted, genuine = revoke if revoke is not None else (b"", False)
        reply = self.link.call(
            "start",
            [self.record_key(task_id)],
            self.ttl,
            by.worker,
            by.pid,
            by.consumer,
            "1" if redelivered else "0",
            "" if copy is None else f"{copy[0]}:{copy[1]}",
            vetted,
            "1" if genuine else "0",
        )
        return reply.decode() if isinstance(reply, bytes) else str(reply)

    def kept_revoke(self, task_id: str) -> bytes | None:
        """The revoke kept in the task's record (unverified); ``None`` if none, or too large."""
        key = self.record_key(task_id)
        fields, _ = read_bounded(self.link, key, {"revoked": MAX_REVOKE_BYTES})
        return fields.get(b"revoked")

    def forget_unsent(self, task_id: str) -> None:
        """Delete a record that only a start check wrote (it names no client)."""
        self.link.call("forget_unsent", [self.record_key(task_id)])

    def settle_args(self, end: Settlement) -> tuple[tuple[str, str, str], tuple[Any, ...]]:
        """Keys and arguments of the step ending a task (see :meth:`settle`).

        Keys: record, channel, ETA set; arguments: ttl, channel length, event, ETA member,
        due time, whether to push back the expiry of the ended-task set and of the channel
        (once a second: see ``WRITE_FINAL``), record fields.
        """
        member, due = _member(end.task_id, end.later)
        keys = (
            self.record_key(end.task_id),
            end.channel,
            self.eta_key(end.later_queue or end.queue),
        )
        fields = _flat(end.fields, end.raw_event)
        # Taken only by a settle that writes the key (a final state marks the task ended).
        ends = end.fields.get("state") in FINAL_STATE_NAMES
        keep_done = self._upkeep(self.done_key, EXPIRY_UPKEEP_SECONDS) if ends else "0"
        tells = end.channel and end.raw_event
        keep_channel = self._upkeep(end.channel, EXPIRY_UPKEEP_SECONDS) if tells else "0"
        args = (
            self.ttl,
            CHANNEL_MAXLEN,
            end.raw_event,
            member,
            repr(due),
            keep_done,
            keep_channel,
            *fields,
        )
        return keys, args

    def settle(self, end: Settlement) -> str:
        """Store a task's end and tell its client (no message to acknowledge).

        No ``fields`` deletes the task's record; ``later`` (a message and its due time)
        is parked until then: a retry. Returns ``''``, or what says the task ended already,
        which keeps its outcome (nothing stored, nothing told): see ``Store.settle``.
        """
        return self.settle_kept(end)[0]

    def settle_kept(self, end: Settlement) -> tuple[str, str]:
        """:meth:`settle`, and the id the event was kept under on its channel (``''``: none).

        On RabbitMQ the event is then published with that id beside it: where its client's
        next catch-up may start (:mod:`~nbtask.brokers.amqp_overlap`).
        """
        keys, args = self.settle_args(end)
        reply = self.link.call("settle", keys, *args, large=len(end.raw_event) >= LARGE_BYTES)
        refused, kept = reply if isinstance(reply, list) and len(reply) == 2 else ("", b"")
        return refused_by(end, refused), entry_text(kept)

    def reset_pending(self, task_id: str) -> None:
        """Set a task that is to run again back to PENDING (a redelivery).

        Only while its record says STARTED: one that ended meanwhile keeps its end.
        """
        self.link.call("reset_pending", [self.record_key(task_id)])

    def note_moved(self, task_id: str, queue: str) -> bool:
        """Name ``queue`` in a waiting task's record (PENDING or RETRY: its message moved there)."""
        return bool(self.link.call("moved", [self.record_key(task_id)], queue))

    def revoke_pending(self, task_id: str, raw_event: bytes, channel: str) -> str:
        """Mark a not-yet-started task REVOKED and tell its client.

        Returns the id ``raw_event`` was kept under on ``channel``, or ``''`` if the task
        was not revoked so. A task whose record says it has started keeps ``raw_event`` in
        its record: its next start is refused as revoked, whatever its plain state says then.
        """
        keys = [self.record_key(task_id), channel]
        return entry_text(self.link.call("revoke", keys, raw_event, self.ttl, CHANNEL_MAXLEN))

    def take_follow_ups(self, task_id: str, taker: str) -> bool | None:
        """Take the follow-ups a task's stated outcome owes: True for ``taker``, else False.

        ``None`` when none were owed (see nbtask.wire.records.FOLLOW_UPS). The first taker
        has them; its own take sent again says True again, so the take is sent once more
        when its reply is lost (Redis may have run it): a taker is one attempt's own.
        """
        take = self.link.evalsha("take_follow_ups", [self.record_key(task_id)], taker)
        with self.link.translate_errors():
            taken = int(self.link.run_scripts([take], idempotent=True)[0])
        return None if taken < 0 else bool(taken)

    def forget_pending(self, publishes: Iterable[tuple[str, str]]) -> None:
        """Delete the PENDING records of ``(task id, channel)`` never queued after all.

        Only where they still say PENDING: RabbitMQ may have taken a message whose answer
        was lost, and a worker that started its task keeps its record.
        """
        commands = [
            self.link.evalsha(
                "forget_pending",
                [self.record_key(task_id), self.client_tasks_key(channel) if channel else ""],
                task_id,
            )
            for task_id, channel in publishes
        ]
        if commands:
            with self.link.translate_errors():
                self.link.run_scripts(commands)

    def recent_tasks(self, group: str, channel: str, limit: int) -> list[tuple[str, str, float]]:
        """Note ``channel`` as a client of ``group``; return the group's newest tasks.

        A group (``<prefix>:client-group:<group>``, a sorted set of channels) outlives its
        clients for ``result_ttl``: a restarted notebook kernel finds the tasks its earlier
        clients sent. Returns ``(task_id, channel, sent_at)``, newest first, at most
        ``limit`` (``limit=0`` only notes the client).
        """
        key = f"{self.prefix}:client-group:{group}"
        now = time.time()
        with self.link.translate_errors():
            if self.link.call("set_aside", [key]):
                log_set_aside(key, "a notebook's clients")
            pipe = self.link.redis.pipeline(transaction=False)
            pipe.zadd(key, {channel: now})
            pipe.zremrangebyscore(key, "-inf", now - self.ttl)
            pipe.expire(key, self.ttl)
            pipe.zrange(key, 0, -1)
            channels = [c.decode("utf-8", "replace") for c in pipe.execute()[-1]]
            if limit <= 0:
                return []
            pipe = self.link.redis.pipeline(transaction=False)
            for name in channels:
                pipe.zrevrange(self.client_tasks_key(name), 0, limit - 1, withscores=True)
            replies = pipe.execute(raise_on_error=False)
        found = [
            (task_id.decode("utf-8", "replace"), name, float(score))
            for name, entries in zip(channels, replies, strict=True)
            if isinstance(entries, list)
            for task_id, score in entries
        ]
        found.sort(key=lambda item: item[2], reverse=True)
        return found[:limit]

    # Control ---------------------------------------------------------------------------------
    def send_control(self, raw: bytes) -> None:
        """Broadcast a signed control message (e.g. terminate) to every worker.

        A control stream Redis refuses it for (a key of another type, or its ids used up
        by an entry put at the last one) was not written by nbtask: it is replaced, with
        one log line (:meth:`append_replacing`).
        """
        key = self.control_key
        self.append_replacing(key, [("XADD", key, "MAXLEN", "~", 1000, "*", "e", raw)])

    def read_control(self, after: str) -> list[tuple[str, bytes]]:
        """Control messages after entry ``after`` (``"$"``: from now on), without waiting.

        An entry whose id is past the clock was not given by Redis: a position there would
        miss every later message, so it is deleted (one log line) and never moved past. A
        key of another type holds none (said once; the next message sent replaces it).
        """
        key = self.control_key
        ahead = str(int((time.time() + _AHEAD_SECONDS) * 1000))
        try:
            with self.link.translate_errors():
                if after == "$":
                    (last,) = self.link.run([("XREVRANGE", key, ahead, "-", "COUNT", 1)])
                    return [(last[0][0].decode() if last else "0-0", b"")]
                (reply,) = self.link.run([("XREAD", "COUNT", 100, "STREAMS", key, after)])
        except ResponseError as exc:
            if not is_wrong_type(exc):
                raise
            if not self._said_control:
                self._said_control = True
                log.error("%s is not a stream nbtask wrote (%s): it holds no message", key, exc)
            return [] if after != "$" else [("0-0", b"")]
        self._said_control = False
        found: list[tuple[str, bytes]] = []
        for _stream, entries in reply or ():
            for raw_id, fields in entries:
                entry_id = raw_id.decode()
                if int(entry_id.split("-")[0]) > int(ahead):
                    self.link.run([("XDEL", key, entry_id)])
                    log.error("deleted entry %s of %s: past the clock, not nbtask's", entry_id, key)
                    return found
                found.append((entry_id, event_of(fields)))
        return found

    # Rate limits -----------------------------------------------------------------------------
    def rate_wait(self, bucket: str, rate: float, task_id: str, horizon: float) -> float:
        """Seconds until task ``task_id`` may start under ``bucket``'s ``rate`` (0: now).

        A task told to wait is given that start: asked again then, it gets 0 and takes no
        other, so tasks start in the order they asked. ``horizon``: no start is that far
        off (a message older than it would not run).
        """
        key = f"{self.prefix}:rate:{bucket}"
        keys = [key, f"{key}:schedule", self.record_key(task_id), f"{key}:given"]
        wait, bad = self.link.call("rate", keys, repr(rate), repr(time.time()), repr(horizon))
        if bad:
            log.warning("reset rate-limit bucket %s, which nbtask did not write", key)
        return float(wait)

    # Task journals -------------------------------------------------------------------------
    def journal_key(self, task_id: str) -> str:
        """The list of what workers said about a task (handler output, log lines)."""
        return f"{self.prefix}:log:{task_id}"

    def append_journal(self, task_id: str, lines: Sequence[str]) -> None:
        """Keep ``lines`` with the task for ``result_ttl`` (:mod:`nbtask.brokers.journals`)."""
        journals.append(self.link, self.journal_key(task_id), lines, self.ttl)

    def read_journal(self, task_id: str) -> list[str]:
        """What workers said about a task, oldest first (unsigned: shown printable)."""
        return journals.read(self.link, self.journal_key(task_id))


def _flat(fields: Mapping[str, str | bytes], raw_event: bytes = b"") -> list[str | bytes]:
    """Record fields as a flat list; the event itself is written once, as ``=event``."""
    return [
        part
        for key, value in fields.items()
        for part in (key, b"=event" if raw_event and value is raw_event else value)
    ]


def _member(task_id: str, later: tuple[bytes, float] | None) -> tuple[bytes, float]:
    """The ETA set member ``"<task id>:<message>"`` and its due time, or nothing."""
    if later is None or not later[0]:
        return b"", 0.0
    return task_id.encode() + b":" + later[0], later[1]


def _glob_escaped(text: str) -> str:
    """``text`` as a ``SCAN MATCH`` pattern matching only itself (a key prefix may hold ``*``)."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)
