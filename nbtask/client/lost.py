"""Tasks a broker lost in an outage: their handles end with an error instead of waiting.

A Redis without persistence that restarts comes back empty: the queued messages are gone
with their tasks' records, and nothing would ever end their handles. Once the client's
listener reads again after an outage, the records of its unfinished handles are read: a
handle whose record holds its outcome ends with it (see
:func:`~nbtask.client.reattach.settle_from_records`), and one whose record is gone, looked
at twice some seconds apart, ends with :class:`~nbtask.errors.TaskNotFound` saying the
broker lost it. Only where the queues live beside the records (the Redis transport): a
durable RabbitMQ queue may still hold a message whose record the Redis store lost, and
a worker then runs it.

Never declared lost: a task whose publish is not answered yet (its thread sends it again
after a reconnect), one this client did not send (re-attached by id), one that started (a
worker holds it; a live worker's heartbeat names what it runs), one sent longer than
``result_ttl`` ago (its record may have expired), and a chain's later step, which has no
record until a worker sends it, unless an earlier step of its chain was lost or the step
before it succeeded (its worker sent it then: lost in the outage like any queued task).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection

from nbtask.brokers import Store
from nbtask.core.handle import TaskHandle
from nbtask.errors import TaskNotFound
from nbtask.wire.events import FINAL_SEQ, Event, EventType, State

__all__ = ["LOST_ADVICE", "LostTasks"]

log = logging.getLogger(__name__)

#: Least time between the two looks at a missing record: a send in flight or a task a
#: worker is about to start has a record by then, and live workers have said what they run.
_CONFIRM_SECONDS = 5.0
#: A send this close to ``result_ttl`` ago may have a record that expired as it should.
_EXPIRY_MARGIN_SECONDS = 60.0

#: What the error of a lost task advises.
LOST_ADVICE = (
    "a Redis that restarts without persistence loses what was queued (enable AOF, "
    "appendonly yes, where that matters); it will not run: send it again"
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
        result_ttl: float,
        *,
        ends_missing: bool,
        heartbeat_interval: float = 1.0,
    ) -> None:
        self._store = store
        self._settle = settle
        self._prefix = prefix
        self._in_doubt = in_doubt
        self._result_ttl = result_ttl
        self._ends_missing = ends_missing
        self._confirm_seconds = max(_CONFIRM_SECONDS, 3 * heartbeat_interval)
        self._due = False  # an outage ended: records are still to read
        # The tasks whose records were missing after the outage, by id: since when each
        # has been missing with its send answered for (None: its send is in doubt still).
        self._missing: dict[str, float | None] = {}
        self._next_look = 0.0

    def outage_ended(self) -> None:
        """The broker answers again: look at the unfinished handles' records."""
        self._due = True

    def due(self) -> bool:
        """Whether :meth:`look` has anything to do now."""
        return self._due or (bool(self._missing) and time.monotonic() >= self._next_look)

    def look(self, handles: list[TaskHandle]) -> None:
        """Look at the records of ``handles`` after an outage, or again at missing ones.

        Raises what reading the store raises: the look is then due again.
        """
        now = time.monotonic()
        if self._due:
            self._settle(handles)
            self._due = False
            if self._ends_missing:  # (after a new outage, every handle is looked at anew)
                self._missing = {h.id: None for h in handles if self._may_be_lost(h)}
        self._next_look = now + self._confirm_seconds
        missing = self._missing
        watched = [h for h in handles if h.id in missing and self._may_be_lost(h)]
        # A send in doubt is read with its thread's next command (and sent again if Redis
        # lost it): looked at again once it is answered for. One sent again between the
        # two reads of what is in doubt has no record yet, and is in doubt after it.
        doubt = self._in_doubt()
        absent = [h for h in watched if h.id not in doubt and self._store.get_record(h.id) is None]
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
        # A live worker's heartbeat names what it runs: one whose start went unseen, and
        # an earlier step whose process is still sending what follows it.
        workers = self._store.workers().values() if confirmed else ()
        running = {task_id for info in workers for task_id in info.busy}
        self._missing = still  # (kept as it was if a read failed: looked at again)
        lost = {
            handle.id: handle
            for handle in confirmed
            if handle.id not in running
            and (handle.parent is None or handle.parent.id not in running)
        }
        if lost:
            self._end_lost(lost, handles)

    def _end_lost(self, lost: dict[str, TaskHandle], handles: list[TaskHandle]) -> None:
        """End the ``lost`` handles, and those of the later steps of their chains."""
        for handle in lost.values():
            _end(handle, self._prefix, f"task {handle.name}[{handle.id}] was lost by the broker")
        for handle in handles:
            earlier = _lost_earlier_step(handle, lost)
            if earlier is not None:
                why = (
                    f"task {handle.name}[{handle.id}] will not run: an earlier task in the "
                    f"chain ({earlier.name}[{earlier.id}]) was lost by the broker"
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
            # One that started is held by a worker, which reports its end.
            and handle.state in (State.PENDING, State.RETRY)
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


def _end(handle: TaskHandle, prefix: str, why: str) -> None:
    """End ``handle`` with :class:`TaskNotFound` saying ``why`` and what to do."""
    reason = f"{why}: its record and its queued message are gone; {LOST_ADVICE}"
    log.error("%s", reason)
    event = Event(
        EventType.FAILURE, handle.id, FINAL_SEQ, {"reason": reason}, run=(prefix, handle.sent)
    )
    handle.apply(event, error=TaskNotFound(reason))
