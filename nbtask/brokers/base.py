"""What the layers above need from a broker: a :class:`Transport` and its :class:`Store`.

A transport moves signed messages: task queues (deliver, acknowledge, redeliver,
dead-letter) and the events workers send to a client. The store keeps what must be
checked atomically or must outlive a client: task records and the start check, client
channels, control messages, ETA parking, rate limits, the worker registry and the large
values sent out of band (blobs). A transport
never looks inside a body, and nothing above ``brokers/`` knows which broker is in use.
What is handed to them and back (a message to publish, a delivery, a task's end, the
start check's verdict) is in :mod:`nbtask.brokers.handoffs`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Protocol

from nbtask.brokers.handoffs import Delivery, Parked, Publish, Settlement, StartBy
from nbtask.wire.blobs import ByteProgress
from nbtask.wire.envelope import Buffer
from nbtask.wire.holdings import Holdings
from nbtask.wire.records import TaskRecord, WorkerInfo

__all__ = [
    "OWED_SECONDS",
    "PIPELINE_WINDOW",
    "Store",
    "Transport",
]

#: Task messages a thread may have published without the broker's answer (RabbitMQ's
#: confirm, Redis's reply) before its next send waits for them.
PIPELINE_WINDOW = 1000
#: How long closing waits, in all, for the answers the broker still owes to what other
#: threads sent without waiting (RabbitMQ's confirms, Redis's replies).
OWED_SECONDS = 3.0


class Store(Protocol):
    """Task records, client channels, control, ETA parking, rate limits, worker registry."""

    def ping(self) -> None:
        """Raise :class:`~nbtask.errors.BrokerUnavailable` unless the store answers."""

    def close(self) -> None:
        """Release connections."""

    def restarts_seen(self) -> int:
        """How many times a connection found the store's server restarted (0 if not known)."""

    # Records -------------------------------------------------------------------------------
    def get_record(self, task_id: str) -> TaskRecord | None:
        """A task's record; ``None`` when unknown or expired."""

    def get_records(self, task_ids: Sequence[str]) -> dict[str, TaskRecord | None]:
        """Tasks' records by id, in one round trip; ``None`` when unknown or expired."""

    def task_ids_starting(self, start: str, limit: int) -> list[str]:
        """Up to ``limit`` ids of kept records that begin with ``start``, sorted."""

    def start(
        self,
        task_id: str,
        by: StartBy,
        *,
        redelivered: bool = False,
        copy: tuple[int, int] | None = None,
        revoke: tuple[bytes, bool] | None = None,
    ) -> str:
        """The start check: ``"OK"`` (now STARTED by ``by``) or the state forbidding it.

        ``copy``: the delivered message's signed ``(retries, rejects)``, once it verified.
        Without it, a task whose message was put back (a retry, a ``Reject`` requeue)
        gets :attr:`~nbtask.brokers.handoffs.Verdict.ASK`: only a verified copy tells
        whether it is the one put back or an earlier one
        (:attr:`~nbtask.brokers.handoffs.Verdict.SUPERSEDED`).

        ``revoke``: the revoke kept in the task's record (:meth:`kept_revoke`) and whether
        its signature verified. Without it, a kept revoke naming the task gets
        :attr:`~nbtask.brokers.handoffs.Verdict.KEPT_REVOKE`; with it, a genuine one
        revokes the task and a forged one is deleted (the check goes on).
        """

    def kept_revoke(self, task_id: str) -> bytes | None:
        """The revoke kept in the task's record, unverified; ``None`` if there is none."""

    def forget_ended_before(self, seconds: float) -> None:
        """Forget which tasks ended more than ``seconds`` ago (their replays are too old)."""

    def forget_unsent(self, task_id: str) -> None:
        """Delete a record that only a start check wrote: no client ever sent that task."""

    def note_moved(self, task_id: str, queue: str) -> bool:
        """Name ``queue`` in the record of a task whose waiting message moved there.

        True once written; False for a task with no record, or one whose message does not
        wait unstarted (its state not one of :data:`~nbtask.wire.events.WAITING_STATES`:
        ``PENDING``, or ``RETRY`` for a retry waiting to run again).
        """

    def settle(self, end: Settlement) -> str:
        """Store a task's end (no fields: delete its record) and tell its client.

        Returns ``''``, or what says the task ended already, which keeps its outcome: the
        record's final state (held with a signed outcome), or ``'ENDED'``.
        """

    def revoke_pending(self, task_id: str, raw_event: bytes, channel: str) -> str:
        """Mark a task REVOKED if it has not started; the id its event was kept under, or ``''``.

        One whose record says it started (its plain state, which anyone with write access
        can set) keeps ``raw_event`` so that it never starts (again) after all.
        """

    def take_follow_ups(self, task_id: str, taker: str) -> bool | None:
        """Take the follow-ups its outcome owes: True for their ``taker``, False, None if none."""

    # Client channels -----------------------------------------------------------------------
    def channel_key(self, client_id: str) -> str:
        """The name of a client's event channel."""

    def is_channel(self, name: str) -> bool:
        """True if ``name`` is shaped like a client channel (records naming one are unsigned)."""

    def channel_end(self, channel: str) -> str:
        """The id of the newest event on a channel (``"0-0"`` when empty)."""

    def replay(self, channel: str) -> list[bytes]:
        """Every event still kept on a client's channel, oldest first."""

    def trimmed_after(self, channel: str, after: str) -> bool:
        """Whether events after entry ``after`` of a channel may have gone unread (trimmed)."""

    def drop_event(self, channel: str, entry_id: str) -> None:
        """Delete one entry of a client's channel."""

    def recent_tasks(self, group: str, channel: str, limit: int) -> list[tuple[str, str, float]]:
        """Note ``channel`` as a client of ``group``; its clients' newest ``(id, channel, at)``."""

    # Control, rate limits ------------------------------------------------------------------
    def send_control(self, raw: bytes) -> None:
        """Broadcast a signed control message to every worker."""

    def read_control(self, after: str) -> list[tuple[str, bytes]]:
        """Control messages after entry ``after`` (``"$"``: just the current last id)."""

    def rate_wait(self, bucket: str, rate: float, task_id: str, horizon: float) -> float:
        """Seconds until a task may start under ``bucket``'s ``rate`` (0: now), in turn."""

    # Blobs ---------------------------------------------------------------------------------
    def put_blobs(
        self,
        blobs: Mapping[str, Buffer],
        keeper: str | None = None,
        *,
        later: bool = False,
        seal: Callable[[str, Buffer], bytes] | None = None,
    ) -> None:
        """Keep large values sent out of band, ``{digest: bytes}``, for ``result_ttl``.

        ``keeper``: the id of the use they serve (a kept value, a task's arguments), which
        :meth:`release_blobs` may delete them for early; without one (results) they stay
        ``result_ttl``. ``later``: the caller holds the value live, so large blobs may be
        written in the background after this returns (readers wait for them). ``seal``:
        the blobs are sealed, named by id (:mod:`nbtask.wire.blobs`): each is stored
        followed by ``seal(id, bytes)``, computed where it is written.
        """

    def writes_later(self, size: int) -> bool:
        """Whether ``put_blobs(..., later=True)`` of ``size`` bytes writes in the background."""

    def holds_writes(self) -> bool:
        """Whether blobs given to be written in the background wait for :meth:`start_writes`."""

    def start_writes(self) -> None:
        """Start writing the blobs given to be written in the background (the outcome is out)."""

    def finish_writes(self, timeout: float | None = None) -> bool:
        """Wait for the blobs this process writes in the background; whether all are written."""

    def pin_blobs(self, sizes: Mapping[str, int]) -> None:
        """Keep the blobs ``{digest: size}`` a message refers to for a full ``result_ttl``."""

    def release_blobs(self, released: Mapping[str, Mapping[str, int]]) -> list[str]:
        """Release uses of blobs, ``{keeper: {digest: size}}``; return the blobs deleted.

        A blob is deleted once no keeper is left and nothing pinned it.
        """

    def get_blob(self, digest: str, size: int, progress: ByteProgress | None = None) -> Buffer:
        """A kept blob's bytes; raise :class:`~nbtask.errors.BlobError` if it is gone.

        ``progress``, if given, is told how many bytes arrived as they arrive.
        """

    def has_blobs(self, sizes: Mapping[str, int]) -> bool:
        """Whether every blob ``{digest: size}`` is kept whole now (one round trip at most)."""

    # Versions ------------------------------------------------------------------------------
    def announce_versions(self, worker_id: str, versions: Mapping[str, str]) -> None:
        """Keep the Python and package versions a worker runs."""

    def versions(self, worker_id: str, modules: Sequence[str]) -> dict[str, str]:
        """The versions of ``modules`` a worker announced."""

    # Notebook sessions ---------------------------------------------------------------------
    def note_notebook(self, modules: Sequence[str], seconds: float) -> None:
        """Say for ``seconds`` that a notebook session uses these workers, needing ``modules``."""

    def notebook_modules(self) -> list[str] | None:
        """The modules a live notebook session's settings need; ``None``: no session."""

    # Task journals -------------------------------------------------------------------------
    def append_journal(self, task_id: str, lines: Sequence[str]) -> None:
        """Keep lines a worker wrote about a task (handler output, log lines) with it."""

    def read_journal(self, task_id: str) -> list[str]:
        """What workers said about a task, oldest first."""

    # Worker registry -----------------------------------------------------------------------
    def heartbeat(self, worker_id: str, info: WorkerInfo) -> None:
        """Announce a live worker."""

    def unregister(self, worker_id: str) -> None:
        """Remove a stopped worker."""

    def end_heartbeat(self, worker_id: str) -> None:
        """Show a stopped worker dead at once, keeping its entry for another to clean up."""

    def workers(self) -> dict[str, WorkerInfo]:
        """Live workers."""

    def workers_if_known(self) -> dict[str, WorkerInfo] | None:
        """Live workers; ``None`` if what one of them runs cannot be read (not nbtask's)."""

    def dead_workers(self) -> dict[str, WorkerInfo | None]:
        """Registered workers whose heartbeat lapsed (``None``: an unreadable entry)."""

    def beats(self, worker_id: str) -> bool:
        """True if ``worker_id``'s heartbeat is current (it beat again since it lapsed)."""

    def claim_dead_worker(self, worker_id: str) -> bool:
        """Take the right to clean up after a dead worker (only one claimant wins)."""

    def forget_worker(self, worker_id: str) -> None:
        """Drop a dead worker from the registry once its deliveries are handled."""

    # What worker processes hold ------------------------------------------------------------
    def announce_holdings(self, consumer: str, holdings: Holdings) -> None:
        """Say what the worker process serving as ``consumer`` holds in memory now."""

    def holdings(self, consumers: Sequence[str]) -> dict[str, Holdings]:
        """What each of ``consumers`` announced it holds."""

    def forget_holdings(self, consumers: Sequence[str]) -> None:
        """Drop the announcements of worker processes that ended."""

    def mark_named(self, namers: Sequence[str], seconds: float) -> None:
        """Say for ``seconds`` that a live notebook session names these kept values.

        ``namers`` as :mod:`nbtask.core.holding` makes them (a session, a kept value).
        """

    def named(self, namers: Sequence[str]) -> set[str]:
        """Those of ``namers`` whose mark (:meth:`mark_named`) has not lapsed."""


class Transport(Protocol):
    """Moves messages: task queues and the events sent to clients."""

    @property
    def store(self) -> Store:
        """The store this transport keeps its records in."""

    def ping(self) -> None:
        """Raise :class:`~nbtask.errors.BrokerUnavailable` unless transport and store answer."""

    def close(self) -> None:
        """Release connections (the store's too)."""

    def answers_within(self, seconds: float) -> contextlib.AbstractContextManager[None]:
        """In the block, this thread gives up on an answer the broker owes after ``seconds``.

        It raises :class:`~nbtask.errors.BrokerUnavailable` then: for what must end even
        when the broker takes what is sent but says nothing (a worker's stop).
        """

    # Client side ---------------------------------------------------------------------------
    def publish(self, messages: Sequence[Publish], *, wait: bool = True) -> list[str]:
        """Enqueue messages with their PENDING records.

        Returns, per message, ``""`` or the state of the task already holding its id
        (queued, running or ended: a revoked chain step, or a reused id); a refused
        message is not queued. With ``wait=False`` a broker that confirms publishes
        asynchronously may return before it has confirmed them (see :meth:`flush`).
        """

    def flush(self) -> None:
        """Wait until the broker has confirmed every message this thread published."""

    def take_unsent(self) -> list[str]:
        """Ids of tasks published without waiting whose messages the broker never took.

        Each is returned once; they are not queued.
        """

    def sends_in_doubt(self) -> set[str]:
        """Ids of tasks this process published without waiting, not answered for yet.

        The broker's answer (or the record's write) is still to be read: such a task may
        have no record now and be queued, or sent again, a moment later.
        """

    def still_queued(self, queues: Mapping[str, Collection[str]]) -> set[str]:
        """Which of the task ids given per queue still have a message waiting there.

        Queued, parked until its ETA, or held unacknowledged by a worker. A slow scan of
        the queues, for the rare look after an outage; an empty set where the queues do
        not live beside the records (:attr:`queues_beside_records` false).
        """

    #: Whether the task queues live in the same server as the records: a record gone
    #: with a restart that lost data then means its queued message went with it. Not so
    #: where a durable queue elsewhere may still hold the message (RabbitMQ).
    queues_beside_records: bool

    def settle_every_thread(self) -> None:
        """Before closing: settle what every thread of this process published, briefly.

        What threads still alive sent without waiting is awaited for a few seconds at
        most; tasks the broker did not confirm by then are noted for :meth:`take_unsent`.
        Never raises :class:`~nbtask.errors.BrokerUnavailable`.
        """

    #: Whether any thread may call :meth:`read_events` (one at a time): the positions it
    #: is given say all there is to where it reads. Else only one thread ever reads.
    events_from_any_thread: bool

    def read_events(
        self, channels: Mapping[str, str], block_seconds: float
    ) -> list[tuple[str, str, bytes]]:
        """Wait for events on ``{channel: last_id}``; return ``(channel, id, raw)`` triples."""

    def events_lost(self, channel: str, after: str) -> bool:
        """Whether events of ``channel`` after ``after`` (a :meth:`read_events` id) went unread.

        A channel keeps a bounded number of events: a client that did not read for a while
        loses the oldest. Their tasks' outcomes are still in their records.
        """

    def wake(self, channel: str) -> None:
        """Make a reader blocked on ``channel`` return at once."""

    def notify(
        self, channel: str, raw_events: Sequence[bytes], *, entries: Sequence[str] = ()
    ) -> None:
        """Deliver events the store already keeps to a live client (nothing more is kept).

        ``entries``: the ids they were kept under on ``channel``, one per event, where
        known (a RabbitMQ client's next catch-up may start after them).
        """

    def event_verified(self, channel: str, entry_id: str) -> None:
        """Note that the event :meth:`read_events` gave as ``entry_id`` of ``channel`` verified.

        Only then may a position sent beside it, unsigned, move where a catch-up starts.
        """

    def keep_channel(self, channel: str) -> None:
        """Keep ``channel``: its client reads it and is alive."""

    def purge(self, queues: Sequence[str]) -> list[str]:
        """Delete the messages waiting on ``queues`` (ETA ones too), not ones being run.

        Returns the task ids seen beside them (unverified).
        """

    # Worker side ---------------------------------------------------------------------------
    def ensure_queues(self, queues: Iterable[str]) -> None:
        """Create the queues (idempotent)."""

    def fetch(self, queues: Sequence[str], consumer: str, block_seconds: float) -> Delivery | None:
        """Take one message for ``consumer`` with its start verdict, waiting a while."""

    def emit(self, channel: str, raw_events: Sequence[bytes]) -> None:
        """Send events to a client, ahead of anything any thread sends it after this returns."""

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
        """Store the record, tell the client, park ``requeue`` for later, acknowledge.

        ``requeue`` is parked for ``requeue_queue`` if given, else for the delivery's queue.

        With ``then_fetch=(queues, consumer, block_seconds)`` the transport may also take
        the next message in the same round trip and return it (else it returns ``None``).
        """

    def discard(self, delivery: Delivery) -> None:
        """Acknowledge and delete a delivery that must not run."""

    def requeue(self, delivery: Delivery, task_id: str) -> None:
        """Put an unfinished delivery back on its queue, counting the redelivery."""

    def dead_letter(self, delivery: Delivery) -> None:
        """Keep a delivery in the dead-letter stream and acknowledge it."""

    def held(self, queues: Sequence[str], consumer: str, min_idle: float = 0.0) -> list[Delivery]:
        """Unacknowledged deliveries of a dead ``consumer`` (lease idle ``min_idle`` s)."""

    def holds_any(self, queues: Sequence[str], consumers: Sequence[str]) -> bool:
        """True if any of ``consumers`` still holds an unacknowledged delivery."""

    def orphans(self, queues: Sequence[str]) -> list[Delivery]:
        """Deliveries of ``queues`` lost by dead holders that the transport itself found."""

    def stale(self, queues: Sequence[str], consumer: str) -> list[Delivery]:
        """Deliveries whose lease lapsed (no renewal for ``visibility_timeout``)."""

    def renew(self, consumers: Sequence[str], queues: Sequence[str]) -> None:
        """Renew the leases that live ``consumers`` hold."""

    def set_aside(self, delivery: Delivery, consumer: str) -> None:
        """Hold ``delivery`` (a dead holder's, left unsettled) as ``consumer``, from now.

        ``consumer`` is one whose lease nobody renews: :meth:`stale` (or :meth:`orphans`)
        gives the delivery again once it lapses, to be looked at again.
        """

    def still_reading(self, consumers: Sequence[str], queues: Sequence[str], within: float) -> bool:
        """True if one of ``consumers`` read one of ``queues`` in the last ``within`` s.

        Asked of a worker whose heartbeat lapsed: its processes reading on show it alive
        (only its supervisor is stopped or slow). ``queues`` are those its clean-up does
        not read as its consumers (their own queues are: the shared ones). Always False
        where the broker cannot tell (RabbitMQ: a consumer there may be a dead process's
        connection still held open; it refuses to delete a consumed queue anyway).
        """

    def forget_consumers(self, consumers: Sequence[str], queues: Sequence[str]) -> None:
        """Forget the consumers of a worker that stopped."""

    def take_waiting(self, queue: str, consumer: str, limit: int = 100) -> list[Delivery]:
        """Take messages still waiting on ``queue`` (no start check), to move them."""

    def move(self, delivery: Delivery, queue: str, raw: bytes, task_id: str) -> None:
        """Put ``raw`` (``delivery``'s message sealed for ``queue``) there; drop the old."""

    def drop_queue(self, queue: str) -> bool:
        """Delete ``queue`` if nothing is on it; True if it is gone."""

    def parked(self, queue: str, limit: int = 100) -> list[Parked]:
        """Up to ``limit`` messages parked for ``queue`` until their due time, soonest first.

        Read to be parked elsewhere (``queue`` is a gone process's own), and left in place.
        """

    def repark(self, parked: Parked, queue: str, raw: bytes, task_id: str) -> bool:
        """Park ``raw`` (``parked``'s message sealed for ``queue``) for ``queue``, due as it was.

        In one step, ``parked`` is dropped and the task's record names ``queue`` (see
        :meth:`Store.note_moved`). False, with nothing done, if ``parked`` is gone: the
        supervisor serving its old queue moved it there meanwhile.
        """

    def dead_letter_parked(self, parked: Parked) -> bool:
        """Keep ``parked`` in the dead-letter stream and drop it; False if it was gone."""

    def move_due(self, queues: Sequence[str]) -> float | None:
        """Move due ETA messages onto their queues; return the next due time, if any."""
