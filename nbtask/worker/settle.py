"""Settling a task: its outcome and the record kept of it.

Every final record a worker writes is built here (:func:`outcome_fields` for a run,
:func:`report` for an outcome nbtask states on a task's behalf: lost, stopped, refused).
What follows a stored outcome (linked tasks, errbacks, handlers) is
:mod:`nbtask.worker.follow_ups`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from nbtask.brokers import Delivery, Transport
from nbtask.core.context import PARTIAL_RESULT, SHOWN_TRACEBACK, Request
from nbtask.core.handlers import (
    ExceptionInfo,
    exception_info,
    log_failure,
    user_traceback,
)
from nbtask.core.task import Task
from nbtask.errors import SerializationError
from nbtask.wire.envelope import Buffer, Signer, dumps
from nbtask.wire.events import (
    FINAL_SEQ,
    Event,
    EventType,
    Run,
    State,
)
from nbtask.wire.exceptions import portable_exception
from nbtask.wire.message import TaskMessage, split
from nbtask.wire.records import (
    FOLLOW_UPS,
    FOLLOW_UPS_OWED,
    PARKED,
    RecordFields,
    TaskRecord,
    final_fields,
)

__all__ = [
    "Outcome",
    "failure_body",
    "failure_event",
    "failure_outcome",
    "outcome_fields",
    "reject_requeue",
    "report",
    "retry_requeue",
    "revoked_body",
    "send_stored_outcome",
    "stopped_event",
    "success_outcome",
]

log = logging.getLogger("nbtask.worker")

# What split() makes of ``None`` (one inline part, no layout): a task returning nothing
# (the most common result) skips making a pickler for it.
_NONE_BODY = bytes(dumps(None))


@dataclasses.dataclass
class Outcome:
    """How one run ended: the final (or retry) event and what goes with it."""

    event: Event
    body: bytes = b""
    retval: Any = None
    exc: BaseException | None = None
    einfo: ExceptionInfo | None = None
    retry_in: float | None = None
    #: The queue a retry is sent to, if not the task's own (``retry(queue=...)``).
    retry_queue: str | None = None
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: The run's request: ``self.request`` in the handlers (``None``: the task did not run).
    request: Request | None = None
    #: A retry's own arguments, ``retry(args=..., kwargs=...)``: ``(args, kwargs)``, each
    #: ``None`` where the task's are kept.
    retry_arguments: tuple[tuple[Any, ...] | None, dict[str, Any] | None] | None = None
    #: The message a retry with its own arguments is sent as, and its body's parts.
    retry_send: tuple[TaskMessage, tuple[Buffer, ...]] | None = None

    @property
    def state(self) -> State:
        """The state the outcome puts the task in."""
        state = self.event.state
        assert state is not None, "an outcome's event always moves the task's state"
        return state

    @property
    def exit_code(self) -> int:
        """The exit code of a forked copy of a child, from how its task code ended."""
        if isinstance(self.exc, SystemExit):
            code = self.exc.code
            return code if isinstance(code, int) else 1
        return 0 if self.exc is None else 1


def success_outcome(
    message: TaskMessage,
    retval: Any,
    whoami: Mapping[str, Any],
    runtime: float,
    seq: int,
    blob_threshold: int,
    put_blobs: Callable[[Mapping[str, Buffer]], None],
) -> Outcome:
    """The outcome of a task that returned ``retval``: its large parts stored as blobs."""
    data = {**whoami, "runtime": runtime, "serializer": message.serializer}
    if retval is None and message.serializer != "json":
        return Outcome(Event(EventType.SUCCESS, message.id, seq, data, run=message.run), _NONE_BODY)
    what = f"the result of task {message.name!r}"
    try:
        result = split(retval, message.serializer, what, blob_threshold)
    except SerializationError as exc:
        return failure_outcome(message, exc, seq, whoami)
    put_blobs(result.blobs)
    if result.layout_json is not None:
        data["layout"] = result.layout_json
    body = b"".join(result.inline)  # small: the large parts are blobs
    event = Event(EventType.SUCCESS, message.id, seq, data, run=message.run)
    return Outcome(event, body, retval=retval)


def failure_outcome(
    message: TaskMessage,
    exc: BaseException,
    seq: int,
    whoami: Mapping[str, Any],
    task: Task | None = None,
) -> Outcome:
    """The outcome of a task that raised ``exc``; the worker's log says so.

    An exception ``task`` expects (its ``throws``) is logged in one line at INFO, without
    its traceback; any other at ERROR, with the traceback from the task's code.
    """
    event = failure_event(message.id, seq, exc, whoami, run=message.run)
    data = event.data
    kind = str(data["etype"]).removeprefix("builtins.")
    said = f"task {message.name}[{message.id}] raised {kind}: {data['evalue']}"
    log_failure(log, task, said, exc, str(data["traceback"]))
    return Outcome(event, failure_body(exc), exc=exc, einfo=exception_info(exc))


def failure_event(
    task_id: str,
    seq: int,
    exc: BaseException,
    details: Mapping[str, Any] | None = None,
    *,
    run: Run,
) -> Event:
    """The FAILURE event for ``exc``, its traceback starting in the user's code.

    An exception that carries its traceback as a notebook shows it
    (:data:`~nbtask.core.context.SHOWN_TRACEBACK`, a cell's) sends it as ``shown_traceback``.
    """
    text = user_traceback(exc)
    kind = type(exc)
    data = {
        **(details or {}),
        "ename": kind.__name__,
        "etype": f"{kind.__module__}.{kind.__qualname__}",
        "evalue": _text_of(exc),
        "traceback": text,
    }
    shown = getattr(exc, SHOWN_TRACEBACK, None)
    if shown and isinstance(shown, list) and all(isinstance(line, str) for line in shown):
        data["shown_traceback"] = shown
    return Event(EventType.FAILURE, task_id, seq, data, run=run)


def _text_of(exc: BaseException) -> str:
    """``str(exc)``, even for an exception whose ``__str__`` raises."""
    try:
        return str(exc)
    except Exception as failed:
        return f"<{type(exc).__name__}: str() raised {type(failed).__name__}>"


def failure_body(exc: BaseException) -> bytes:
    """What travels with a FAILURE event, signed: the exception and the task's partial work.

    The exception itself, and what the task did before it failed
    (:data:`~nbtask.core.context.PARTIAL_RESULT`), when they pickle: the exception
    without running its ``__init__`` again, and without the attributes that do not
    pickle if need be. The client raises the task's own exception type from it; a body
    that does not pickle (or load) leaves the event's text, and a ``RemoteError``.
    """
    partial = exc.__dict__.pop(PARTIAL_RESULT, None) if hasattr(exc, "__dict__") else None
    if hasattr(exc, "__dict__"):  # the event has it already
        exc.__dict__.pop(SHOWN_TRACEBACK, None)
    tb = exc.__traceback__
    try:
        exc.__traceback__ = None  # frames do not travel; the event has their text
        for travelling in (
            portable_exception(exc),
            portable_exception(exc, picklable_only=True),
            None,
        ):
            try:
                return dumps({"exception": travelling, "partial": partial})
            except Exception:
                continue
        return b""
    finally:
        exc.__traceback__ = tb


def revoked_body(exc: BaseException) -> bytes:
    """What travels with the REVOKED event of a task stopped while it ran: its partial work.

    What the task did before the interrupt reached it (a notebook cell's names bound so far,
    as an interrupted cell leaves them locally), when it pickles; else nothing.
    """
    partial = exc.__dict__.pop(PARTIAL_RESULT, None) if hasattr(exc, "__dict__") else None
    if partial is None:
        return b""
    try:
        return dumps({"partial": partial})
    except Exception:
        return b""


def retry_requeue(
    signer: Signer, message: TaskMessage, outcome: Outcome, body: Buffer
) -> tuple[bytes, float] | None:
    """A retry's message (``body``: the retried message's) and when it is due, else ``None``.

    ``created`` is kept: it names the send, which the retry's events name too (its age
    counts from its signed eta). Its ``retries`` is the number its record says is parked
    (see :func:`outcome_fields`).
    """
    if outcome.retry_in is None:
        return None
    due = time.time() + outcome.retry_in
    retried, parts = outcome.retry_send or (message, body)
    header = {**retried.to_header(), "retries": message.retries + 1, "eta": due}
    if outcome.retry_queue:  # retry(queue=...): signed as sent there (no fallback)
        header["queue"] = outcome.retry_queue
        header.pop("fallback_queue", None)
    return signer.seal(header, parts), due


def reject_requeue(
    signer: Signer, message: TaskMessage, body: Buffer, delay: float
) -> tuple[bytes, float]:
    """The message a ``Reject(requeue=True)`` puts back, and when it is due (``delay`` on).

    Sealed again as a retry's is: its ``rejects`` (the times put back, which bound it) one
    more, and its ``eta`` the due time, so no unsigned count decides when it stops and
    moving it early in the store does not run it early.
    """
    due = time.time() + delay
    header = {**message.to_header(), "rejects": message.rejects + 1, "eta": due}
    return signer.seal(header, body), due


def outcome_fields(
    signer: Signer, message: TaskMessage, outcome: Outcome, raw_event: bytes
) -> RecordFields:
    """The record kept of a run: its state, and its signed result unless told otherwise."""
    state, at = outcome.state, outcome.event.timestamp
    if state is State.RETRY:
        # Parked once per retry number (see nbtask.wire.records.PARKED).
        fields = {**final_fields(state, b"", at), PARKED: str(message.retries + 1)}
        if outcome.retry_queue:  # retry(queue=...): the record names where it waits now
            fields["queue"] = outcome.retry_queue
        return fields
    if not message.store_result:
        # backend=None: no result at all, only a signed note that the task ended, kept
        # like any record so that a replay of its message cannot run it again.
        header = {**outcome.event.to_header(), "data": {"result_kept": False}}
        return final_fields(state, signer.seal(header), at)
    if message.ignore_result and state is State.SUCCESS:
        # The outcome is still signed in the store; only the value is left out.
        kept = {**outcome.event.data, "result_kept": False}
        return final_fields(state, signer.seal({**outcome.event.to_header(), "data": kept}), at)
    return final_fields(state, raw_event, at)


def report(
    transport: Transport,
    signer: Signer,
    task_id: str,
    channel: str,
    event: Event,
    delivery: Delivery | None = None,
    body: bytes = b"",
    *,
    owes_follow_ups: bool = False,
) -> None:
    """Store and send a final event nbtask states on a task's behalf (and ack ``delivery``).

    ``body`` goes with it (a failed step's exception, for the later steps of its chain).
    With ``owes_follow_ups`` the record says its follow-ups are owed (see
    :meth:`~nbtask.worker.follow_ups.FollowUps.run_owed`): only if this outcome is the one stored.
    """
    raw = signer.seal(event.to_header(), body)
    assert event.state is not None
    fields = final_fields(event.state, raw, event.timestamp)
    if owes_follow_ups:
        fields[FOLLOW_UPS] = FOLLOW_UPS_OWED
    transport.finish(delivery, task_id, channel, raw, fields)


def send_stored_outcome(transport: Transport, channel: str, record: TaskRecord | None) -> None:
    """Send a task's stored final outcome to its client once more, if it has one.

    On RabbitMQ a child stores a task's outcome in Redis, then publishes its event: one that
    dies in between leaves an outcome its client never heard of. Whoever then finds the task
    finished (its supervisor, or the worker its message comes back to) sends it; a handle
    that has its outcome ignores a second copy.
    """
    if record is not None and record.result:
        transport.notify(channel, [record.result])


def stopped_event(stopped: tuple[str, str, float], reason: str, name: str, run: Run) -> Event:
    """The final event of a task its supervisor killed on purpose (``stopped``: id, why, when)."""
    task_id, why, _ = stopped
    if why == "revoked":
        return Event(EventType.REVOKED, task_id, FINAL_SEQ, {"reason": "terminated"}, run=run)
    evalue = f"task {name} ran past its hard time limit and its process was killed"
    data = {"ename": "TimeLimitExceeded", "reason": reason, "evalue": evalue}
    return Event(EventType.FAILURE, task_id, FINAL_SEQ, data, run=run)
