"""What follows a task's stored outcome: linked tasks, errbacks, a chain's later steps, handlers.

On success the ``link`` signatures are sent (a chain's next step among them); on any other
end the ``link_error`` ones, and the chain's later steps are failed with it. Then Celery's
handlers run, in Celery's order. An outcome stored owing its follow-ups
(:func:`owes_follow_ups`) has them run once, by whoever takes them in the store
(:meth:`FollowUps.run_owed`).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TypeVar

from nbtask.brokers import Publish, Transport
from nbtask.core.call_checks import AUTO_ID
from nbtask.core.canvas import Callbacks, Signature
from nbtask.core.handlers import ExceptionInfo, call_handlers
from nbtask.core.outcome import final_outcome
from nbtask.core.task import Task
from nbtask.errors import BrokerUnavailable, NbtaskError
from nbtask.wire.blobs import argument_keeper, blob_sizes, parse_layout
from nbtask.wire.envelope import Buffer, Signer
from nbtask.wire.events import (
    FINAL_SEQ,
    FINAL_STATES,
    Deferred,
    Event,
    EventType,
    State,
    Unloadable,
    decode_event,
)
from nbtask.wire.message import TaskMessage, decode_value
from nbtask.worker.errbacks import errback_calls, unrun_request
from nbtask.worker.settle import Outcome, report
from nbtask.worker.subtasks import SubtaskPublisher

__all__ = ["FollowUps", "has_handlers", "killed_past_its_time_limit", "owes_follow_ups"]

log = logging.getLogger("nbtask.worker")

_AFTER_HANDLERS = ("on_success", "on_failure", "on_retry", "after_return")
# Task's own handlers (which do nothing), by name.
_BASE_HANDLERS = {name: getattr(Task, name) for name in ("before_start", *_AFTER_HANDLERS)}
#: How long a take of owed follow-ups (and the read of their outcome) is sent again while
#: the broker is away, seconds.
_TAKE_PATIENCE = 60.0
T = TypeVar("T")


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
        if owed and self._take(message.id) is False:
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

    def run_owed(
        self,
        message: TaskMessage,
        links: Buffer,
        handled: Callable[[Outcome], Task | None] | None = None,
    ) -> bool | None:
        """Run the follow-ups of a stored outcome, if still owed.

        The supervisor that stored it (a lost, killed or dead-lettered task), or whoever
        holds the task's message later (a child that died after storing its task's
        outcome; RabbitMQ gives a killed child's message back after its outcome was
        stored), runs them; taking them in the store makes that once. A success's
        callbacks and next chain step are given its stored result. ``handled``, from a
        child process: the task whose handlers run too for an outcome its process did
        not live to handle (a hard time limit's, see :func:`killed_past_its_time_limit`),
        its run's arguments and request set on the outcome; ``None`` if it has none.
        Returns what the take said: True (run now), False (run before), ``None`` (none
        owed: the task's own process stored an outcome that owes none).
        """
        taken = self._take(message.id)
        if taken:
            # Taken: the outcome is read however long the store is away (up to the same
            # patience), or the follow-ups would be taken and never sent.
            what = f"read the stored outcome of task {message.id}"
            outcome = self._patiently(what, lambda: self._stored_outcome(message.id))
            if outcome is None:
                log.error("task %s owes follow-ups but its stored outcome is gone", message.id)
            else:
                task = None
                if handled is not None and killed_past_its_time_limit(outcome):
                    task = handled(outcome)
                    # What its handle raises (TimeLimitExceeded), as Celery's on_failure gets.
                    label = f"{message.name}[{message.id}]"
                    exc = final_outcome(outcome.event, None, message.id, label).error
                    if exc is not None:
                        tb = str(outcome.event.data.get("traceback", ""))
                        outcome.exc, outcome.einfo = exc, ExceptionInfo(exc, tb)
                self.run(message, outcome, links, task)
        return taken

    def _take(self, task_id: str) -> bool | None:
        """Take the task's owed follow-ups (see ``Store.take_follow_ups``), as one taker.

        While the broker is away (up to ``_TAKE_PATIENCE`` seconds) the take is sent again
        as the same taker: one Redis ran whose reply was lost takes them again, where a new
        taker would find them taken, and no one would send them.
        """
        taker = f"{os.getpid()}:{uuid.uuid4().hex}"
        what = f"take the follow-ups of task {task_id}"
        return self._patiently(what, lambda: self.transport.store.take_follow_ups(task_id, taker))

    def _patiently(self, what: str, call: Callable[[], T]) -> T:
        """``call()``, again while the broker is away, for up to ``_TAKE_PATIENCE`` seconds."""
        give_up = time.monotonic() + _TAKE_PATIENCE
        backoff = 0.1
        while True:
            try:
                return call()
            except BrokerUnavailable as exc:
                if time.monotonic() + backoff > give_up:
                    raise
                log.warning("cannot %s yet (%s); retrying in %.1f s", what, exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

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
        except BrokerUnavailable:
            raise  # read again (see run_owed), not taken for a result that does not load
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
        self.send(
            message.client,
            [
                Signature(sig.task, (*first, *sig.args), sig.kwargs, {**sig.options, **family})
                for sig, first in calls
            ],
        )

    def send(self, channel: str, sigs: Sequence[Signature]) -> list[TaskMessage]:
        """Send ``sigs`` for ``channel``'s client; their messages, queued or not.

        One its task's record refused (not queued: revoked ahead, say) has its owed
        follow-ups run here (:meth:`_follow_unsent`).
        """
        sends = self.publisher.publish_each(channel, sigs)
        for step, publish, refused in sends:
            if refused:
                self._follow_unsent(step, publish)
        return [step for step, _, _ in sends]

    def _follow_unsent(self, step: TaskMessage, publish: Publish) -> None:
        """Run the owed follow-ups of a task whose message its record refused (not queued).

        A chain's later step, or a task a running task sends (through :meth:`send`),
        revoked ahead (before this worker sent
        it): the revoke stored its outcome owing its errbacks and the ending of the steps
        after it, and no worker will ever hold its message to take them, so this one does,
        once (a copy taken by another, a large message the start check drops, finds them
        taken). A record that owes none (a rerun sending a step again) is left as it is.
        """
        try:
            _, links, _ = step.split(self.signer.open(publish.raw))
            if self.run_owed(step, links):
                log.warning(
                    "task %s was revoked before it was sent: its errbacks were sent and the "
                    "steps after it ended",
                    step.id,
                )
        except Exception:
            # The outcome that sent it is stored; only this step's follow-ups are lost.
            log.exception("could not run the follow-ups of revoked task %s", step.id)

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


def killed_past_its_time_limit(outcome: Outcome) -> bool:
    """Whether ``outcome`` is the one a supervisor stored for a task it killed past its limit.

    Its hard time limit (:func:`~nbtask.worker.settle.stopped_event`): the task's handlers
    did not run in its process, and run with its follow-ups in a child process.
    """
    data = outcome.event.data
    return (
        outcome.event.type is EventType.FAILURE
        and data.get("ename") == "TimeLimitExceeded"
        and "reason" in data
    )


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


def has_handlers(task: Task, names: Sequence[str] = _AFTER_HANDLERS) -> bool:
    """True if the task has any handler of its own that runs after the outcome.

    Its class's (a subclass, or ``@app.task(on_success=...)``) or one set on the instance.
    ``names``: of these handlers instead (``before_start``, ``on_success``, ``on_failure``,
    ``on_retry``, ``after_return``).
    """
    # Asked of every task: the class's attribute, and the instance's only if it has one
    # (no bound method is made).
    cls, own = type(task), vars(task)
    for name in names:
        base = _BASE_HANDLERS[name]
        if name in own:
            if getattr(own[name], "__func__", None) is not base:
                return True
        elif getattr(cls, name) is not base:
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
