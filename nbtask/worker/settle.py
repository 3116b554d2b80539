"""Settling a task: its outcome, the record kept of it, and what follows it.

Every final record a worker writes is built here (:func:`outcome_fields` for a run,
:func:`report` for an outcome nbtask states on a task's behalf: lost, stopped, refused),
and so is everything that follows an outcome: linked tasks (or failing a chain's later
steps) and Celery's handlers, in Celery's order, after the outcome is stored.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from nbtask.brokers import Delivery, Transport
from nbtask.core.call_checks import AUTO_ID
from nbtask.core.canvas import Callbacks, Signature
from nbtask.core.context import PARTIAL_RESULT, Request
from nbtask.core.handlers import (
    ExceptionInfo,
    call_handlers,
    exception_info,
    log_failure,
    user_traceback,
)
from nbtask.core.task import Task
from nbtask.errors import NbtaskError, SerializationError
from nbtask.wire.blobs import argument_keeper, blob_sizes, parse_layout
from nbtask.wire.envelope import Buffer, Signer, dumps
from nbtask.wire.events import (
    FINAL_SEQ,
    FINAL_STATES,
    Deferred,
    Event,
    EventType,
    Run,
    State,
    Unloadable,
    decode_event,
)
from nbtask.wire.exceptions import portable_exception
from nbtask.wire.message import TaskMessage, decode_value, split
from nbtask.wire.records import (
    FOLLOW_UPS,
    FOLLOW_UPS_OWED,
    RecordFields,
    TaskRecord,
    final_fields,
)
from nbtask.worker.errbacks import errback_calls, unrun_request
from nbtask.worker.subtasks import SubtaskPublisher

__all__ = [
    "FollowUps",
    "Outcome",
    "failure_body",
    "failure_event",
    "failure_outcome",
    "has_handlers",
    "outcome_fields",
    "owes_follow_ups",
    "report",
    "revoked_body",
    "send_stored_outcome",
    "stopped_event",
    "success_outcome",
]

log = logging.getLogger("nbtask.worker")

_AFTER_HANDLERS = ("on_success", "on_failure", "on_retry", "after_return")
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
    """The FAILURE event for ``exc``, its traceback starting in the user's code."""
    text = user_traceback(exc)
    kind = type(exc)
    data = {
        **(details or {}),
        "ename": kind.__name__,
        "etype": f"{kind.__module__}.{kind.__qualname__}",
        "evalue": _text_of(exc),
        "traceback": text,
    }
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


def outcome_fields(
    signer: Signer, message: TaskMessage, outcome: Outcome, raw_event: bytes
) -> RecordFields:
    """The record kept of a run: its state, and its signed result unless told otherwise."""
    state = outcome.state
    if state is State.RETRY:
        return final_fields(state, b"")
    header = outcome.event.to_header()
    if not message.store_result:
        # backend=None: no result at all, only a signed note that the task ended, kept
        # like any record so that a replay of its message cannot run it again.
        return final_fields(state, signer.seal({**header, "data": {"result_kept": False}}))
    if message.ignore_result and state is State.SUCCESS:
        # The outcome is still signed in the store; only the value is left out.
        kept = {**outcome.event.data, "result_kept": False}
        return final_fields(state, signer.seal({**header, "data": kept}))
    return final_fields(state, raw_event)


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
    :meth:`FollowUps.run_owed`): only if this outcome is the one stored.
    """
    raw = signer.seal(event.to_header(), body)
    assert event.state is not None
    fields = final_fields(event.state, raw)
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


class FollowUps:
    """What follows a stored outcome: linked tasks, a chain's later steps, the handlers.

    Parameters
    ----------
    transport, signer
        Where failed later steps of a chain are reported.
    publisher
        Sends linked tasks.
    """

    def __init__(self, transport: Transport, signer: Signer, publisher: SubtaskPublisher) -> None:
        self.transport = transport
        self.signer = signer
        self.publisher = publisher

    def run(
        self,
        message: TaskMessage,
        outcome: Outcome,
        links: Buffer,
        task: Task | None,
        *,
        owed: bool = False,
    ) -> None:
        """Send linked tasks (or fail a chain's later steps), call the handlers.

        ``links`` is the message's pickled callbacks. Then, once the task has ended, its
        argument blobs may go. With ``owed`` the stored outcome says its follow-ups are
        owed (:func:`owes_follow_ups`): they are taken in the store first, and left to
        whoever took them before (the supervisor of a process that died meanwhile).
        """
        # Loaded before they are taken: a process that dies loading them (a callback
        # argument whose loading kills it) leaves them owed, for its supervisor.
        callbacks = _callbacks(message, links)
        if owed and self.transport.store.take_follow_ups(message.id) is False:
            log.warning("the follow-ups of task %s were run by another process", message.id)
            callbacks = None
        try:
            if callbacks:
                self._send_callbacks(message, outcome, callbacks)
        except Exception:
            # e.g. a callback argument that cannot be pickled. The task's own outcome is
            # stored; the chain's later steps cannot be told who they are.
            log.exception("could not send the callbacks of task %s", message.id)
        if task is not None and has_handlers(task):
            _call_handlers(task, message, outcome)
        # Only a layout names argument blobs (without one, the arguments were inline).
        if message.args_layout and outcome.state in FINAL_STATES:
            self._release_arguments(message)

    def run_owed(self, message: TaskMessage, links: Buffer) -> bool | None:
        """Run the follow-ups of a stored outcome, if still owed.

        The supervisor that stored it (a lost, killed or dead-lettered task), or whoever
        holds the task's message later (a child that died after storing its task's
        outcome; RabbitMQ gives a killed child's message back after its outcome was
        stored), runs them; taking them in the store makes that once. A success's
        callbacks and next chain step are given its stored result.
        Returns what the take said: True (run now), False (run before), ``None`` (none
        owed: the task's own process stored an outcome that owes none).
        """
        taken = self.transport.store.take_follow_ups(message.id)
        if taken:
            outcome = self._stored_outcome(message.id)
            if outcome is None:
                log.error("task %s owes follow-ups but its stored outcome is gone", message.id)
            else:
                self.run(message, outcome, links, None)
        return taken

    def _stored_outcome(self, task_id: str) -> Outcome | None:
        """The task's stored final outcome, verified; ``None`` if there is none."""
        record = self.transport.store.get_record(task_id)
        if record is None or not record.result:
            return None
        try:
            envelope = self.signer.open(record.result)
            event = Event.from_header(envelope.header)
        except NbtaskError:
            return None
        if event.task_id != task_id or event.state not in FINAL_STATES:
            return None
        outcome = Outcome(event, bytes(envelope.body))
        if event.type is EventType.SUCCESS:
            return self._with_result(outcome, record.result)
        return outcome

    def _with_result(self, outcome: Outcome, raw: bytes) -> Outcome | None:
        """A stored success with its result (what its callbacks are given), if it loads."""
        try:
            _, value = decode_event(self.signer, raw, self.transport.store.get_blob)
            value = value.load() if isinstance(value, Deferred) else value
        except Exception as exc:
            value = Unloadable.of(exc)
        if outcome.event.data.get("result_kept") is False or isinstance(value, Unloadable):
            log.error("the result of task %s is not kept or does not load", outcome.event.task_id)
            return None
        outcome.retval = value
        return outcome

    def _release_arguments(self, message: TaskMessage) -> None:
        """Let the store delete the ended task's argument blobs that no other use needs.

        A retry is not an end: its message carries the same blobs. Where this cannot be
        done (the store is away), the blobs stay until ``result_ttl``.
        """
        try:
            sizes = blob_sizes(parse_layout(message.args_layout))
            if sizes:
                self.transport.store.release_blobs({argument_keeper(message.id): sizes})
        except (NbtaskError, OSError) as exc:
            log.warning("the argument blobs of task %s stay until result_ttl: %s", message.id, exc)

    def _send_callbacks(self, message: TaskMessage, outcome: Outcome, callbacks: Callbacks) -> None:
        """Send ``link`` signatures on success, ``link_error`` ones on any other end."""
        state = outcome.state
        if state is State.SUCCESS:
            calls = [(sig, () if sig.immutable else (outcome.retval,)) for sig in callbacks.link]
        elif state in (State.FAILURE, State.REVOKED, State.WORKER_LOST):
            request = outcome.request or unrun_request(message, outcome.args, outcome.kwargs)
            calls = errback_calls(message, request, outcome, callbacks.link_error)
            # Later steps of a chain will never run: tell their handles why, now.
            self._fail_downstream(message, outcome, callbacks.link)
        else:
            return
        family = {"parent_id": message.id, "root_id": message.root_id}
        self.publisher.publish(
            message.client,
            [
                Signature(sig.task, (*first, *sig.args), sig.kwargs, {**sig.options, **family})
                for sig, first in calls
            ],
        )

    def _fail_downstream(
        self, message: TaskMessage, outcome: Outcome, links: Sequence[Signature]
    ) -> None:
        for sig in links:
            task_id = sig.options.get("task_id")
            if not task_id or sig.options.get(AUTO_ID):  # a link no handle waits on
                continue
            data = {
                **outcome.event.data,
                "reason": f"an earlier task in the chain ({message.id}) did not succeed",
                "upstream": message.id,
            }
            # Never sent: the send its chain stamped, which its handle knows.
            run = (message.prefix, _stamp(sig.options.get("sent")))
            event = Event(outcome.event.type, task_id, FINAL_SEQ, data, run=run)
            body = outcome.body if outcome.state is State.FAILURE else b""
            report(self.transport, self.signer, task_id, message.client, event, body=body)
            nested = sig.options.get("callbacks")
            if isinstance(nested, Callbacks):
                self._fail_downstream(message, outcome, nested.link)


def owes_follow_ups(message: TaskMessage, outcome: Outcome, links: Buffer) -> bool:
    """Whether a task's own process stores ``outcome`` saying its follow-ups are owed.

    An outcome that sends callbacks or a chain's next step (a success), or errbacks and
    fails a chain's later steps: stored owing them, with the task's message held until they
    are sent, a process killed in between leaves them to whoever settles that message (its
    supervisor; on RabbitMQ, whoever the message comes back to), which runs them once
    (:meth:`FollowUps.run_owed`). A success whose result is not kept (``ignore_result``,
    no backend) is not: its result, which its callbacks are given, is nowhere else.
    """
    if not links:
        return False  # (the hot path: a task without follow-ups costs nothing more)
    if outcome.state is State.SUCCESS:
        # Sent again from the stored result: only where the record keeps it.
        return message.store_result and not message.ignore_result
    return outcome.state in (State.FAILURE, State.REVOKED)


def _stamp(sent: object) -> float | None:
    """The send a chain stamped on a later step (``None`` from an nbtask before it)."""
    return float(sent) if isinstance(sent, (int, float)) and not isinstance(sent, bool) else None


def _callbacks(message: TaskMessage, links: Buffer) -> Callbacks | None:
    """The linked signatures a verified message carries, if any can be loaded."""
    if not links:
        return None
    try:
        callbacks = decode_value(links, "cloudpickle")
    except Exception:
        # e.g. a callback argument whose class this worker cannot import. The task's
        # own outcome is stored; the chain's later steps cannot be told who they are.
        log.exception("could not load the callbacks of task %s", message.id)
        return None
    return callbacks if isinstance(callbacks, Callbacks) else None


def has_handlers(task: Task) -> bool:
    """True if the task has any handler of its own that runs after the outcome.

    Its class's (a subclass, or ``@app.task(on_success=...)``) or one set on the instance.
    """
    for name in _AFTER_HANDLERS:
        handler = getattr(task, name)
        if getattr(handler, "__func__", None) is not getattr(Task, name):
            return True
    return False


def _call_handlers(task: Task, message: TaskMessage, outcome: Outcome) -> None:
    """Celery's handlers, in Celery's order, after the outcome is stored."""
    call_handlers(
        log,
        task,
        outcome.state,
        message.id,
        outcome.args,
        outcome.kwargs,
        retval=outcome.retval,
        exc=outcome.exc,
        einfo=outcome.einfo,
        request=outcome.request or unrun_request(message, outcome.args, outcome.kwargs),
    )
