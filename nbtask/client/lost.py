"""Tasks a broker lost in an outage: their handles end with an error instead of waiting.

A Redis without persistence that restarts comes back empty: the queued messages are gone
with their tasks' records and the events not read yet, and nothing would ever end their
handles. Once the client's listener reads again after an outage, or its connection is
made again to a server that restarted meanwhile (a new run id: no outage need be seen,
as by a process stopped across the restart), the records of its unfinished handles are
read: a handle whose record holds its outcome ends with it (see
:func:`~nbtask.client.reattach.settle_from_records`), and one whose record is gone, looked
at twice some seconds apart, ends with :class:`~nbtask.errors.TaskNotFound` unless a live
worker runs it or a message of it is still on its queue (or parked until its ETA). The
error says what is known: it will not run from now on, but it may have run before a
restart (its outcome went with its record), and one that started says on which worker,
and that whether it finished is unknown. Only where the queues live beside the records
(the Redis transport): a durable RabbitMQ queue may still hold a message whose record the
Redis store lost, and a worker then runs it.

Never declared lost: a task whose publish is not answered yet (its thread sends it again
after a reconnect), one this client did not send (re-attached by id), one a live worker's
heartbeat names as running, one still queued, one sent longer than ``result_ttl`` ago
(its record may have expired), and a chain's later step, which has no record until a
worker sends it, unless an earlier step of its chain was lost or the step before it
succeeded (its worker sent it then: lost in the outage like any queued task).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping

from nbtask.brokers import Store
from nbtask.core.handle import TaskHandle
from nbtask.errors import TaskNotFound
from nbtask.wire.events import FINAL_SEQ, WAITING_STATES, Event, EventType, State

__all__ = ["LOST_ADVICE", "LostTasks"]

log = logging.getLogger(__name__)

#: Least time between the two looks at a missing record: a send in flight or a task a
#: worker is about to start has a record by then, and live workers have said what they run.
_CONFIRM_SECONDS = 5.0
#: A send this close to ``result_ttl`` ago may have a record that expired as it should.
_EXPIRY_MARGIN_SECONDS = 60.0

#: What the error of a lost task advises.
LOST_ADVICE = (
    "it will not run from now on; it may have run before a restart (its outcome went with "
    "its record): send it again only if running it twice is acceptable. A Redis without "
    "persistence loses what was queued and kept when it restarts (enable AOF, appendonly "
    "yes, where that matters)"
)
#: Why a task's record and message are gone, whether a restart was seen or not.
_RESTARTED = "the Redis server restarted (a new run id) and did not keep them"
_UNSEEN = (
    "the broker never received it (a send it did not answer for), or it restarted "
    "without persistence"
)


class LostTasks:
    """Looks for tasks an outage lost, from the thread reading the client's events.

    Parameters
    ----------
    store, prefix
        Where records are read, the app's key prefix.
    settle
        Ends the handles whose tasks' records hold their signed outcomes
        (:func:`~nbtask.client.reattach.settle_from_records`).
    in_doubt
        Ids of tasks this process sent whose publishes are not answered for yet.
    result_ttl
        How long records are kept: older sends are not looked at.
    still_queued
        Which of the task ids given per queue still have a message there
        (:meth:`~nbtask.brokers.base.Transport.still_queued`).
    ends_missing
        Whether a missing record means the task is lost (queues beside the records);
        else only outcomes are taken from the records.
    heartbeat_interval
        How often workers say what they run: the second look waits a few of them.
    """

    def __init__(
        self,
        store: Store,
        prefix: str,
        settle: Callable[[list[TaskHandle]], None],
        in_doubt: Callable[[], Collection[str]],
        still_queued: Callable[[Mapping[str, Collection[str]]], set[str]],
        result_ttl: float,
        *,
        ends_missing: bool,
        heartbeat_interval: float = 1.0,
    ) -> None:
        self._store = store
        self._settle = settle
        self._prefix = prefix
        self._in_doubt = in_doubt
        self._still_queued = still_queued
        self._result_ttl = result_ttl
        self._ends_missing = ends_missing
        self._confirm_seconds = max(_CONFIRM_SECONDS, 3 * heartbeat_interval)
        self._due = False  # an outage ended: records are still to read
        # The tasks whose records were missing after the outage, by id: since when each
        # has been missing with its send answered for (None: its send is in doubt still).
        self._missing: dict[str, float | None] = {}
        self._next_look = 0.0
        # The server's restarts seen by the listener's connections, and whether one was
        # seen since the missing records were first looked at (errors say so).
        self._restarts = store.restarts_seen()
        self._restarted = False

    def outage_ended(self) -> None:
        """The broker answers again: look at the unfinished handles' records."""
        self._due = True

    def due(self) -> bool:
        """Whether :meth:`look` has anything to do now.

        A connection made again to a restarted server counts as an outage that ended.
        """
        if self._store.restarts_seen() != self._restarts:
            self._due = True
        return self._due or (bool(self._missing) and time.monotonic() >= self._next_look)

    def look(self, handles: list[TaskHandle]) -> None:
        """Look at the records of ``handles`` after an outage, or again at missing ones.

        Raises what reading the store raises: the look is then due again.
        """
        now = time.monotonic()
        if self._due:
            restarts = self._store.restarts_seen()
            self._restarted = restarts != self._restarts or (
                self._restarted and bool(self._missing)
            )
            self._settle(handles)
            self._due, self._restarts = False, restarts
            if self._ends_missing:  # (after a new outage, every handle is looked at anew)
                self._missing = {h.id: None for h in handles if self._may_be_lost(h)}
        self._next_look = now + self._confirm_seconds
        missing = self._missing
        watched = [h for h in handles if h.id in missing and self._may_be_lost(h)]
        # A send in doubt is read with its thread's next command (and sent again if Redis
        # lost it): looked at again once it is answered for. One sent again between the
        # two reads of what is in doubt has no record yet, and is in doubt after it.
        doubt = self._in_doubt()
        looked = [h for h in watched if h.id not in doubt]
        records = self._store.get_records([h.id for h in looked]) if looked else {}
        absent = [h for h in looked if records[h.id] is None]
        doubt = {*doubt, *self._in_doubt()}
        still: dict[str, float | None] = {h.id: None for h in watched if h.id in doubt}
        confirmed = []
        for handle in absent:
            since = missing[handle.id]
            if handle.id in doubt:
                continue
            if since is not None and now - since >= self._confirm_seconds:
                confirmed.append(handle)
            else:
                still[handle.id] = now if since is None else since
        lost = self._confirm(confirmed)
        if lost is None:  # what a live worker runs is unknown: looked at again later
            still.update({h.id: missing[h.id] for h in confirmed})
            lost = {}
        self._missing = still  # (kept as it was if a read failed: looked at again)
        if lost:
            self._end_lost(lost, handles)

    def _confirm(self, confirmed: list[TaskHandle]) -> dict[str, TaskHandle] | None:
        """Those of ``confirmed`` (no record at two looks) that are lost, by id.

        Not one a live worker's heartbeat names (one whose start went unseen, one that
        runs on through the outage), nor an earlier step whose process is still sending
        what follows it; then not one whose record is back (it ended meanwhile), nor one
        still queued. Read in that order, so a task that starts or ends between two reads
        is never missed. ``None`` when a live worker's registry entry cannot be read (not
        nbtask's: anyone with write access to Redis can put one there): what it runs is
        unknown, so none is lost for now.
        """
        if not confirmed:
            return {}
        live = self._store.workers_if_known()
        if live is None:
            log.warning(
                "a live worker's entry in the worker registry cannot be read (nbtask did not "
                "write it): %d task(s) whose records are missing are not taken for lost while "
                "it is there",
                len(confirmed),
            )
            return None
        workers = list(live.values())
        running = {task_id for info in workers for task_id in info.busy}
        unnamed = [
            handle
            for handle in confirmed
            if handle.id not in running
            and (handle.parent is None or handle.parent.id not in running)
        ]
        records = self._store.get_records([h.id for h in unnamed]) if unnamed else {}
        left = [handle for handle in unnamed if records[handle.id] is None]
        if not left:
            return {}
        # A chain's later step does not know its queue: looked for on every queue known.
        known = {h.queue for h in left if h.queue} | {q for w in workers for q in w.queues}
        by_queue: dict[str, list[str]] = {}
        for handle in left:
            for queue in [handle.queue] if handle.queue else sorted(known):
                by_queue.setdefault(queue, []).append(handle.id)
        queued = self._still_queued(by_queue)
        return {handle.id: handle for handle in left if handle.id not in queued}

    def _end_lost(self, lost: dict[str, TaskHandle], handles: list[TaskHandle]) -> None:
        """End the ``lost`` handles, and those of the later steps of their chains."""
        cause = _RESTARTED if self._restarted else _UNSEEN
        for handle in lost.values():
            _end(handle, self._prefix, _lost_reason(handle, cause))
        for handle in handles:
            earlier = _lost_earlier_step(handle, lost)
            if earlier is not None:
                why = (
                    f"task {handle.name}[{handle.id}] will not run from now on: an earlier "
                    f"task in the chain ({earlier.name}[{earlier.id}]) was lost by the "
                    f"broker ({cause}); {LOST_ADVICE}"
                )
                _end(handle, self._prefix, why)

    def _may_be_lost(self, handle: TaskHandle) -> bool:
        """Whether a missing record would mean ``handle``'s task is lost."""
        oldest = time.time() - self._result_ttl + _EXPIRY_MARGIN_SECONDS
        return (
            not handle.done()
            # Sent by this client, which knows what it has not been answered for, or a
            # chain's later step whose earlier step succeeded (a worker sent it then);
            # not a later step whose earlier one is still to end, nor a handle re-attached
            # by id (``outcomes_after`` set), which another process may send again with
            # its next command.
            and ((bool(handle.queue) and handle.parent is None) or _sent_by_a_worker(handle))
            and handle.outcomes_after is None
            # One that started and runs on is named by its worker's heartbeats; one that
            # ended while its outcome went unread lost that outcome with its record.
            and (handle.running() or handle.state in WAITING_STATES)
            and handle.sent is not None
            and handle.sent >= oldest
        )


def _sent_by_a_worker(handle: TaskHandle) -> bool:
    """Whether ``handle`` is a chain's later step whose earlier step succeeded.

    The earlier step's worker stores its outcome, then sends this step: the two looks at a
    missing record, some seconds apart, leave it time to, and a step whose earlier one a
    live worker's heartbeat still names (its process still sending what follows it) is
    never declared lost.
    """
    earlier = handle.parent
    return earlier is not None and earlier.done() and earlier.state is State.SUCCESS


def _lost_earlier_step(handle: TaskHandle, lost: dict[str, TaskHandle]) -> TaskHandle | None:
    """The earlier step of ``handle``'s chain that was just found lost, if one was."""
    step = handle.parent
    while step is not None and not handle.done():
        if lost.get(step.id) is step:
            return step
        step = step.parent
    return None


def _lost_reason(handle: TaskHandle, cause: str) -> str:
    """Why ``handle``'s task is lost, and what is known of whether it ran."""
    label = f"task {handle.name}[{handle.id}]"
    if not handle.running():
        return (
            f"{label} was lost by the broker: neither its record nor a queued message is "
            f"left ({cause}); {LOST_ADVICE}"
        )
    info = handle.info
    where = f"worker {info.get('worker', '?')} (pid {info.get('pid', '?')})"
    return (
        f"{label} started on {where}, and its outcome was lost by the broker: its record "
        f"and its events are gone and no live worker runs it ({cause}). Whether it "
        "finished is unknown; it will not run from now on: send it again only if running "
        "it twice is acceptable (enable AOF, appendonly yes, where a restart must not lose "
        "outcomes)"
    )


def _end(handle: TaskHandle, prefix: str, reason: str) -> None:
    """End ``handle`` with :class:`TaskNotFound` saying ``reason``."""
    log.error("%s", reason)
    event = Event(
        EventType.FAILURE, handle.id, FINAL_SEQ, {"reason": reason}, run=(prefix, handle.sent)
    )
    handle.apply(event, error=TaskNotFound(reason))
