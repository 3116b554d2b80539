"""Re-attaching to a task by id, from any process: ``App.handle(task_id)``."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from nbtask._text import printable
from nbtask.brokers import Store
from nbtask.client.listener import Listener
from nbtask.core.handle import Client, TaskHandle
from nbtask.core.options import check_task_id
from nbtask.errors import NbtaskError, SignatureError, TaskNotFound
from nbtask.wire.envelope import Signer
from nbtask.wire.events import FINAL_STATES, Event, EventType, State, decode_event
from nbtask.wire.records import TaskRecord

__all__ = [
    "SHORT_ID_LENGTH",
    "journal_of",
    "reattach",
    "resolve_task_id",
    "settle_ended",
    "settle_from_records",
]

log = logging.getLogger(__name__)


#: An outcome is stored a little after it is made, and clocks of hosts differ: one made
#: up to this long before ``result_ttl`` ago may still be in its record.
_STORED_LATE_SECONDS = 60.0


#: The fewest characters of an id that name its task (what views show of an id): git's and
#: Docker's unique prefixes, for an id copied from ``%tasks`` or a waiting line.
SHORT_ID_LENGTH = 8
# A prefix of an id as nbtask makes them (uuid4().hex) and views show them: hex digits,
# short of a whole id (an expired whole one, re-attached, costs no walk over the store's
# keys). Other text names only the task of that very id: a user's own ids (``report-1``, a
# dashed UUID) are never taken for the start of another's, and a record planted with a
# longer id cannot draw a revoke meant for one.
_PREFIX = re.compile(rf"[0-9a-f]{{{SHORT_ID_LENGTH},31}}")
_AMBIGUOUS_SHOWN = 5  # the ids an ambiguous prefix's error names


def _not_found_reasons(result_ttl: float) -> str:
    """Why a task id has no record, for :class:`TaskNotFound`."""
    return (
        f"the id is wrong, the task finished more than result_ttl ({result_ttl:.0f} s) ago, "
        "or it is a later step of a chain not sent yet (a worker writes a step's record "
        "when it sends it, once the step before succeeds): try again once the earlier "
        "steps have ended"
    )


def resolve_task_id(store: Store, text: str, result_ttl: float, *, unsent: bool = False) -> str:
    """The id of the task ``text`` names: its whole id, or a unique prefix of it.

    An id with a record is itself; otherwise ``text`` of :data:`SHORT_ID_LENGTH` or more
    hex digits (short of a whole id as nbtask makes them) names the one task whose kept
    record's id begins with it. With ``unsent``, text that has no record and begins no
    kept id is itself too: a task not sent yet (a chain's later step, a task given its
    own id), which a revoke marks ahead, as Celery's does.

    Raises
    ------
    TaskNotFound
        No task has this id or one beginning with it, or several begin with it.
    """
    check_task_id(text)
    if store.get_record(text) is not None:
        return text
    prefix = _PREFIX.fullmatch(text) is not None
    found = store.task_ids_starting(text, _AMBIGUOUS_SHOWN + 1) if prefix else []
    if not found and unsent:
        return text
    if not found:
        also = ", nor one whose id begins with it" if prefix else ""
        raise TaskNotFound(
            f"no task {text!r} in the result store{also}: {_not_found_reasons(result_ttl)}"
        )
    if len(found) > 1:
        shown = ", ".join(found[:_AMBIGUOUS_SHOWN]) + (
            ", ..." if len(found) > _AMBIGUOUS_SHOWN else ""
        )
        raise TaskNotFound(
            f"{text!r} begins the ids of several tasks ({printable(shown)}): give more of the id"
        )
    return found[0]


def journal_of(store: Store, text: str, result_ttl: float) -> list[str]:
    """What workers said about the task ``text`` names (its id, or a unique prefix of it).

    A journal may outlive its task's record: the one of the id as given is read first.
    """
    return store.read_journal(text) or store.read_journal(resolve_task_id(store, text, result_ttl))


def reattach(
    task_id: str,
    *,
    owner: Client,
    store: Store,
    signer: Signer,
    listener: Listener,
    result_ttl: float,
    prefix: str,
) -> TaskHandle:
    """A handle on ``task_id`` built from its record (see :meth:`nbtask.App.handle`).

    Events the task already sent are replayed while its client's channel keeps them; a
    finished task's signed result comes from the store and must be that task's, sent by
    the app of key prefix ``prefix``, of its newest send. A task still running is
    followed through ``listener``, on its client's channel.

    The record is unsigned: its ``sent`` may name an earlier send of a task id used again,
    with that send's genuine result put back beside it. The send followed is the newest
    that the record or a signed event names (only earlier genuine events can be put
    back), and an outcome made more than ``result_ttl`` ago is refused: its own record
    is gone, and an id is used again only once it is.
    """
    record = store.get_record(task_id)
    if record is None:
        raise TaskNotFound(
            f"no task {task_id!r} in the result store: {_not_found_reasons(result_ttl)}"
        )
    # The label is unsigned, as the name: shown only, never with control characters.
    label = printable(record.label)
    # Unsigned: only a name shaped like a client channel of this app is ever read.
    channel = record.client if store.is_channel(record.client) else ""
    kept = _kept_events(store, signer, channel, task_id, prefix)
    handle = TaskHandle(owner, task_id, record.name or "?", record.queue, label)
    handle.sent = _newest(record.sent, *(event.run[1] for event in kept))
    handle.outcomes_after = time.time() - result_ttl - _STORED_LATE_SECONDS
    stored = _stored_outcome(handle, record.result, store, signer, prefix)
    if stored is not None:
        # Output first, from the client's event channel while it is kept.
        for event in kept:
            if event.state not in FINAL_STATES and event.not_for(prefix, handle.sent) is None:
                handle.apply(event)
        _end(handle, record, *stored)
    else:
        # Where a broker keeps only final events (AMQP), the record alone says the task
        # is running; the channel's events, if kept, then replay on top of it.
        if record.state in (State.STARTED, State.RETRY):
            handle.apply(_recorded_start(record, task_id))
        listener.register(handle, channel=channel or None)
        # A task that ended between the record's read and the registration sent its end
        # to no handle (on this client's own channel, the listener reads on from where it
        # is): its record has it now.
        again = store.get_record(task_id)
        if again is not None:
            stored = _stored_outcome(handle, again.result, store, signer, prefix)
            if stored is not None:
                _end(handle, again, *stored)
    return handle


def settle_from_records(
    handles: list[TaskHandle], *, store: Store, signer: Signer, prefix: str
) -> None:
    """End each of ``handles`` whose task's record holds its signed outcome.

    For a client whose channel trimmed events before it read them: the tasks that ended
    meanwhile end here as their events would have ended them. One whose record is gone
    (older than ``result_ttl``), or holds no outcome of this send, is left waiting.
    """
    for handle in handles:
        record = store.get_record(handle.id)
        if record is None or handle.done():
            continue
        try:
            stored = _stored_outcome(handle, record.result, store, signer, prefix)
        except NbtaskError as exc:  # not its own outcome: its events may still come
            log.warning("task %s: %s", handle.id, exc)
            continue
        if stored is not None:
            _end(handle, record, *stored)


def settle_ended(handle: TaskHandle, *, store: Store, signer: Signer, prefix: str) -> None:
    """End ``handle``, just registered, if its task already ended: output first, then outcome.

    The task's events went to its client's channel once each: read before the handle was
    registered, they reached no handle (on either broker, however soon after it was made).
    Its record keeps the signed outcome, and the channel its output while it is kept. A
    record with no outcome of the handle's send leaves it waiting for its events.
    """
    record = store.get_record(handle.id)
    if record is None:
        return
    try:
        stored = _stored_outcome(handle, record.result, store, signer, prefix)
    except NbtaskError as exc:  # an earlier use of the id, say: its events may still come
        log.info("task %s: %s; waiting for its events", handle.id, exc)
        return
    if stored is None:
        return
    channel = record.client if store.is_channel(record.client) else ""
    for event in _kept_events(store, signer, channel, handle.id, prefix):
        if event.state not in FINAL_STATES and handle.refusal(event, prefix) is None:
            handle.apply(event)
    _end(handle, record, *stored)


def _kept_events(
    store: Store, signer: Signer, channel: str, task_id: str, prefix: str
) -> list[Event]:
    """The signed events about ``task_id`` of the app ``prefix`` kept on ``channel``.

    Headers only: the events replayed here carry no value, and the send they name is
    all that is asked of the others.
    """
    kept = []
    for raw in store.replay(channel) if channel else ():
        try:
            event = Event.from_header(signer.open(raw).header)
        except NbtaskError:
            continue
        if event.task_id == task_id and event.run[0] == prefix:
            kept.append(event)
    return kept


def _newest(*sends: float | None) -> float | None:
    """The latest of the sends named (``None`` if none is)."""
    return max((sent for sent in sends if sent is not None), default=None)


def _recorded_start(record: TaskRecord, task_id: str) -> Event:
    """The STARTED (or RETRY) event a record stands for, at the time it says, if it does."""
    info = {"worker": record.worker, "pid": record.pid}
    kind = EventType.RETRY if record.state is State.RETRY else EventType.STARTED
    if record.started_at is None:
        return Event(kind, task_id, 0, info)
    return Event(kind, task_id, 0, info, record.started_at)


def _stored_outcome(
    handle: TaskHandle, raw: bytes | None, store: Store, signer: Signer, prefix: str
) -> tuple[Event, Any] | None:
    """The task's signed, stored final event and its result; ``None`` if none is stored.

    Raises
    ------
    SignatureError
        What is stored does not verify, or is another task's (or another send's).
    """
    if raw is None:
        return None
    event, result = decode_event(signer, raw, store.get_blob)
    if event.task_id != handle.id:
        # Correctly signed, but another task's: someone moved it here.
        raise SignatureError(
            f"the stored result of task {handle.id!r} belongs to task {event.task_id!r}"
        )
    # A re-attached handle moves on to a later send than any the record or the events
    # name; one that knows its send takes that send's alone.
    why = handle.refusal(event, prefix)
    if why is not None:  # another app's, or an earlier send's: someone put it here
        raise SignatureError(f"the stored result of task {handle.id!r} is not its own: {why}")
    if event.state not in FINAL_STATES:
        # The task's own, but not an outcome (someone copied a progress report there):
        # followed as a task with no outcome yet, never waited on unregistered.
        log.warning(
            "the stored result of task %s is a %s event, not an outcome; following the task",
            handle.id,
            event.type.value,
        )
        return None
    return event, result


def _end(handle: TaskHandle, record: TaskRecord, event: Event, result: Any) -> None:
    """End ``handle`` with the task's stored final ``event`` and ``result``."""
    # An end that does not say when the run began (a lost worker's), its other events
    # gone: the record's start it is.
    began = handle.started_at is not None or "started_at" in event.data
    if not began and record.started_at is not None:
        handle.apply(_recorded_start(record, handle.id))
    handle.apply(event, result)
