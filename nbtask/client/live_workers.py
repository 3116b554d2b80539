"""What a client knows of the live workers: the worker registry, read every few seconds.

Sending checks two things against it without a broker round trip per task: that the
workers of a queue share this client's secret (else the send is refused), and whether any
live worker consumes the queue at all (else the task's handle says why it waits). Both
read one snapshot of the registry, read again at most every :data:`REFRESH_SECONDS`.

A worker whose heartbeat lapsed is not said gone at once: one paused a moment (a loaded
host, a long collection) misses heartbeats too. Its process is looked at if it ran on this
host (one stopped is said to be); one of another host is taken for late for
:data:`LATE_SECONDS`.

It also keeps what the registry cannot say yet: the work this client sent to one worker
process's own queue (where a kept value is held) and has not seen end, so work on kept
values sent back to back knows that process is busy before the process announces it.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Generic, TypeVar

from nbtask._process import pid_is, pid_stopped, sees_pids_of
from nbtask._text import printable
from nbtask.brokers import Store
from nbtask.core.datasets import dataset_of_queue
from nbtask.core.handle import StartedBy, TaskHandle
from nbtask.core.holding import is_holder_queue
from nbtask.errors import BrokerUnavailable, ConfigurationError
from nbtask.wire.records import WorkerInfo

__all__ = ["LATE_SECONDS", "REFRESH_SECONDS", "LiveWorkers", "unserved_reason"]

#: The oldest snapshot of the registry that sending and handles go by, seconds.
REFRESH_SECONDS = 2.0
#: The oldest snapshot that may say a queue or a process has no live worker, seconds: a
#: worker (or child) that started since is seen before a task is said to lack one.
NEGATIVE_SECONDS = 0.25

#: How long a worker of another host whose heartbeat lapsed is taken for late, not gone,
#: from when this client first found it lapsed, seconds (its process cannot be looked at).
LATE_SECONDS = 5.0

_Key = TypeVar("_Key", bound=Hashable)

#: How much of a worker's id (unsigned: anyone's text) an error names.
_NAMED_CHARS = 60


def unserved_reason(queue: str) -> str:
    """Why a task on ``queue`` waits when no live worker consumes it (nor may be late)."""
    return f"no live worker consumes queue {queue!r}"


def _stopped(info: WorkerInfo) -> str:
    """Why work waits on a worker whose process is stopped (it sends no heartbeats)."""
    return (
        f"its worker (host {printable(info.hostname[:_NAMED_CHARS])}, pid {info.pid}) is "
        f"stopped (SIGSTOP, or Ctrl-Z in its terminal): it goes on once continued "
        f"(kill -CONT {info.pid}, or fg there)"
    )


def _runs(snapshot: _Snapshot, hostname: str, pid: int) -> bool:
    """Whether a live worker on ``hostname`` has ``pid`` among its child processes."""
    return any(i.hostname == hostname and pid in i.pids for i in snapshot.workers.values())


@dataclasses.dataclass
class _Snapshot:
    workers: dict[str, WorkerInfo]
    taken: float  # time.monotonic()
    #: Every queue some live worker consumes.
    queues: frozenset[str] = dataclasses.field(init=False)
    #: Queues whose workers in this snapshot were found to share the client's secret.
    trusted: set[str] = dataclasses.field(default_factory=set)
    #: The registered workers whose heartbeat lapsed, read when first needed.
    lapsed: dict[str, WorkerInfo] | None = None

    def __post_init__(self) -> None:
        self.queues = frozenset(q for info in self.workers.values() for q in info.queues)


class _Recent(Generic[_Key]):
    """Answers read from the store, said again for :data:`REFRESH_SECONDS` per key.

    Views ask often (a waiting cell ten times a second, a widget every second): what a
    task's record (and the dead workers' entries) said is said again for as long as the
    registry's snapshot is, not read anew per look.
    """

    def __init__(self) -> None:
        # Key -> when it was answered, and what was said.
        self._said: dict[_Key, tuple[float, str | None]] = {}

    def answer(self, key: _Key, read: Callable[[], str | None]) -> str | None:
        """What was said of ``key`` within :data:`REFRESH_SECONDS`; else ``read()`` now."""
        now = time.monotonic()
        said = self._said.get(key)
        if said is not None and now - said[0] <= REFRESH_SECONDS:
            return said[1]
        answer = read()
        kept = {k: v for k, v in self._said.items() if now - v[0] <= REFRESH_SECONDS}
        kept[key] = (now, answer)
        self._said = kept  # (replaced whole: read by other threads without a lock)
        return answer


class LiveWorkers:
    """The live workers of one broker, as of a recent read of its registry.

    Parameters
    ----------
    store
        Holds the registry (each live worker's queues, secrets, last heartbeat).
    key_id
        The public id of this client's secret (:attr:`~nbtask.wire.envelope.Signer.key_id`).
    """

    def __init__(self, store: Store, key_id: str) -> None:
        self._store = store
        self._key_id = key_id
        self._snapshot: _Snapshot | None = None
        self._failed_at = float("-inf")  # when a quiet read last failed
        # (Worker id, its last heartbeat's time as its entry says) -> when this client first
        # found that heartbeat lapsed (time.monotonic()): a worker that beat again since
        # lapses anew, even where nothing was asked while it was live.
        self._lapse_seen: dict[tuple[str, float], float] = {}
        # What lost_reason said of a (run, queue), and moved_to of a (task id, queue).
        self._lost_said: _Recent[tuple[StartedBy, str]] = _Recent()
        self._moved_said: _Recent[tuple[str, str]] = _Recent()
        # Own queue -> the handles of work sent there, oldest first; weakly held, so a
        # handle (and its result) the notebook let go is not kept for this.
        self._at_holders: dict[str, collections.OrderedDict[str, weakref.ref[TaskHandle]]] = {}
        self._lock = threading.Lock()

    def read(self) -> dict[str, WorkerInfo]:
        """Read the registry now (one round trip); later checks go by what it found."""
        return self._read().workers

    def recent(self) -> dict[str, WorkerInfo]:
        """The registry as last read, if within :data:`REFRESH_SECONDS`; else read now."""
        return self._current().workers

    def _read(self) -> _Snapshot:
        snapshot = _Snapshot(self._store.workers(), time.monotonic())
        self._snapshot = snapshot
        return snapshot

    def _current(self) -> _Snapshot:
        snapshot = self._snapshot
        if snapshot is not None and time.monotonic() - snapshot.taken <= REFRESH_SECONDS:
            return snapshot
        return self._read()

    def check_secret(self, queues: Iterable[str]) -> None:
        """Refuse to send where live workers could not verify the message (a wrong secret).

        Workers announce the public ids of the secrets they accept; one that does not know
        this client's would dead-letter the message, and the client could not even read
        its report.

        Raises
        ------
        ConfigurationError
            A live worker of one of ``queues`` names secrets, none of them this client's.
        """
        snapshot = self._current()
        for queue in queues:
            if queue in snapshot.trusted:
                continue
            serving = {w: i for w, i in snapshot.workers.items() if queue in i.queues}
            # A worker that names no secret (an older nbtask) cannot be judged: skipped.
            strangers = sorted(
                w for w, i in serving.items() if i.keys and self._key_id not in i.keys
            )
            if strangers:
                also = "also " if len(strangers) < len(serving) else ""
                named = ", ".join(printable(w[:_NAMED_CHARS]) for w in strangers[:3])
                raise ConfigurationError(
                    f"queue {queue!r} is {also}served by workers that do not share this "
                    f"client's secret ({named}): they would refuse its tasks. Set "
                    "NBTASK_SECRET to the workers' secret, or give apps with different "
                    "secrets different key prefixes (NBTASK_KEY_PREFIX). If no such "
                    "worker runs (`nbtask status` lists each one's host and pid), someone "
                    "wrote these registry entries: the registry is not signed"
                )
            snapshot.trusted.add(queue)

    def waiting_reason(self, queue: str, started_by: StartedBy | None = None) -> str | None:
        """Why a task sent to ``queue`` waits, if no live worker consumes it; else ``None``.

        For a task ``started_by`` a run (a worker process): why it may not end, see
        :meth:`lost_reason`. Never raises: when the registry cannot be read, nothing is
        claimed (and it is not tried again for a few seconds).
        """
        if started_by is not None:
            return self.lost_reason(started_by, queue)
        snapshot = self._quiet_read(lambda snapshot: queue in snapshot.queues)
        if snapshot is None or queue in snapshot.queues:
            return None
        try:
            late = self._late(snapshot, lambda info: queue in info.queues)
        except BrokerUnavailable:
            self._failed_at = time.monotonic()
            return None
        if late is not None:
            return late or None
        dataset = dataset_of_queue(queue)
        if dataset is None:
            return unserved_reason(queue)
        # Required by name: a misspelt name waits as long as a dataset no one started.
        held = sorted({d for info in snapshot.workers.values() for d in info.datasets})
        return (
            f"no live worker holds dataset {dataset!r} (the live ones hold: "
            f"{', '.join(held) or 'none'}); start one with nbtask worker --data "
            f"{dataset}=module:function"
        )

    def moved_to(self, task_id: str, queue: str) -> str | None:
        """The queue a task sent to one process's own ``queue`` was moved to, if it was.

        What waits on such a queue is moved by a live worker once that process is gone
        (see ``LostTasks.rehome``), and its record then names the queue it went to: read
        only while no live worker consumes ``queue``, and at most every
        :data:`REFRESH_SECONDS` per task, as :meth:`lost_reason` reads one. ``None`` while
        it was not moved, or when that cannot be told. Never raises.
        """
        if not is_holder_queue(queue):
            return None  # (only work on a process's own queue is moved without an event)
        snapshot = self._quiet_read(lambda snapshot: queue in snapshot.queues)
        if snapshot is None or queue in snapshot.queues:
            return None
        return self._moved_said.answer((task_id, queue), lambda: self._moved(task_id, queue))

    def _moved(self, task_id: str, queue: str) -> str | None:
        """:meth:`moved_to` once no live worker consumes ``queue``: its record read."""
        try:
            record = self._store.get_record(task_id)
        except BrokerUnavailable:
            self._failed_at = time.monotonic()
            return None
        return record.queue if record is not None and record.queue != queue else None

    def _quiet_read(self, live: Callable[[_Snapshot], bool]) -> _Snapshot | None:
        """The registry to say from whether something is ``live``; ``None`` if unreadable.

        A snapshot that says not (``live`` false) is read again when older than
        :data:`NEGATIVE_SECONDS`: the worker or child may be younger than that read. When
        the registry cannot be read, it is not tried again for a few seconds.
        """
        now = time.monotonic()
        if now - self._failed_at < REFRESH_SECONDS:
            return None
        try:
            snapshot = self._current()
            if not live(snapshot) and now - snapshot.taken > NEGATIVE_SECONDS:
                snapshot = self._read()
        except BrokerUnavailable:
            self._failed_at = now
            return None
        return snapshot

    def lost_reason(self, run: StartedBy, queue: str) -> str | None:
        """Why a task whose ``run`` is in a process no live worker names may not end.

        ``None`` while a live worker names that process (or it cannot be told). Else the
        task's record says who ran it (its consumer): a child of a worker that still
        sends heartbeats died, and that worker settles the task itself; or the worker
        left the registry (no heartbeat), and the task ends only when a live worker of
        the queue its message was on settles it, so a notebook waiting for it is told
        rather than left waiting without a word. ``queue``: the queue it was sent to (or
        its last retry sent it to), named when that of the worker that ran it is not
        known. Never raises, as :meth:`waiting_reason`.
        """
        hostname, pid = run.hostname, run.pid
        snapshot = self._quiet_read(lambda snapshot: _runs(snapshot, hostname, pid))
        if snapshot is None or _runs(snapshot, hostname, pid):
            return None
        return self._lost_said.answer((run, queue), lambda: self._lost_reason(run, queue, snapshot))

    def _lost_reason(self, run: StartedBy, queue: str, snapshot: _Snapshot) -> str | None:
        """:meth:`lost_reason` once ``snapshot`` names no live process of ``run``."""
        hostname, pid = run.hostname, run.pid
        try:
            record = self._store.get_record(run.task_id)
        except BrokerUnavailable:
            self._failed_at = time.monotonic()
            return None
        if record is not None and (record.worker, record.pid) != (hostname, str(pid)):
            return None  # it started again since: the new run's events are on their way
        consumer = record.consumer if record is not None else ""
        owner = next((i for i in snapshot.workers.values() if consumer in i.consumers), None)
        if owner is not None:
            began = run.began if run.began is not None else record and record.started_at
            # A worker that has not announced since the run began has not named its
            # process yet (a child that just replaced another): nothing is wrong.
            if not began or owner.seen <= began:
                return None
            return (
                f"the process running it (host {hostname}, pid {pid}) stopped; its worker "
                f"(pid {owner.pid}) is alive and settles it: WORKER_LOST, or it runs again "
                "if acks_late"
            )
        try:
            late = None
            if consumer:
                late = self._late(snapshot, lambda info: consumer in info.consumers)
            if late is not None:
                return late or None
            lapsed = self._lapsed(snapshot).values()
            dead = next((i for i in lapsed if consumer and consumer in i.consumers), None)
        except BrokerUnavailable:  # the dead worker is not known: its process is named
            dead = None
        queues = [queue]
        if dead is not None:  # a retry may have sent the task to another of its queues
            served = [q for q in dead.queues if not is_holder_queue(q)]
            queues = queues if queue in served or not served else served
        named = " or ".join(repr(q) for q in queues)
        if dead is None and run.queue_unsure:  # its retry may have named another queue
            named = f"{queue!r} (or the one its retry named)"
        settled = (
            f"a live worker of queue {named} settles it (WORKER_LOST, or runs it again if "
            "acks_late) once the visibility timeout has passed"
            if any(q in snapshot.queues for q in queues)
            else f"it is settled once a worker of queue {named} runs (nbtask worker -Q "
            f"{','.join(queues)}); none is live now"
        )
        who = (
            f"its worker (host {hostname}, pid {dead.pid})"
            if dead is not None
            else f"the worker of its process (host {hostname}, pid {pid})"
        )
        return f"{who} stopped sending heartbeats: {settled}"

    def _lapsed(self, snapshot: _Snapshot) -> dict[str, WorkerInfo]:
        """The workers whose heartbeat lapsed, as read once for ``snapshot``.

        Raises
        ------
        BrokerUnavailable
            The registry cannot be read.
        """
        if snapshot.lapsed is None:
            dead = self._store.dead_workers()
            snapshot.lapsed = {w: i for w, i in dead.items() if i is not None}
            now, seen = time.monotonic(), self._lapse_seen
            lapses = [(w, i.seen) for w, i in snapshot.lapsed.items()]
            self._lapse_seen = {lapse: seen.get(lapse, now) for lapse in lapses}
        return snapshot.lapsed

    def _late(self, snapshot: _Snapshot, serves: Callable[[WorkerInfo], bool]) -> str | None:
        """What to say of a worker that ``serves`` whose heartbeat lapsed, if it may be late.

        ``None`` if none may be (gone, as far as can be told). Else ``""`` (nothing is
        wrong yet), or why it does not go on: its process is stopped. Of this host: its
        process still runs. Of another: it was first found lapsed less than
        :data:`LATE_SECONDS` ago, and did not say it stopped (pid 0).

        Raises
        ------
        BrokerUnavailable
            The registry cannot be read.
        """
        now = time.monotonic()
        for worker_id, info in self._lapsed(snapshot).items():
            if not serves(info):
                continue
            if sees_pids_of(info.place):
                if pid_is(info.pid, info.started, info.start_ticks):
                    return _stopped(info) if pid_stopped(info.pid) else ""
            elif (
                info.pid > 0
                and now - self._lapse_seen.get((worker_id, info.seen), now) < LATE_SECONDS
            ):
                return ""
        return None

    def note_sent(self, handles: Sequence[TaskHandle]) -> None:
        """Remember the work sent to worker processes' own queues until it ends."""
        held = [handle for handle in handles if handle.queue and is_holder_queue(handle.queue)]
        if not held:
            return
        with self._lock:
            for handle in held:
                sent = self._at_holders.setdefault(handle.queue, collections.OrderedDict())
                sent[handle.id] = weakref.ref(handle)
                self._unended(handle.queue)

    def sent_to(self, queue: str) -> bool:
        """Whether work this client sent to ``queue`` (a process's own) has not ended."""
        with self._lock:
            return self._unended(queue)

    def _unended(self, queue: str) -> bool:
        # Work on one queue ends mostly in the order it was sent: what ended is dropped
        # from the oldest on, up to the first that has not, so long loops of sends stay
        # cheap and the record of them short.
        sent = self._at_holders.get(queue)
        while sent:
            handle = sent[next(iter(sent))]()
            if handle is not None and not handle.done():
                return True
            sent.popitem(last=False)
        self._at_holders.pop(queue, None)
        return False
