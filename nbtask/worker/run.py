"""Running one admitted task in a worker's child: its request, its limits, how it ended.

The **run** step of a child (:mod:`nbtask.worker.child`): the task's arguments are loaded
(its named datasets come from this process), ``before_start`` is called, the task's code
runs under its soft time limit and the terminate interrupt, and how it ended becomes an
:class:`~nbtask.worker.settle.Outcome`: its result, its failure, a retry (asked for or
automatic), or its stop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from types import CoroutineType
from typing import Any

from nbtask.brokers import Transport
from nbtask.core.canvas import sending_through
from nbtask.core.context import Request, running
from nbtask.core.current import task_running
from nbtask.core.datasets import DatasetCache
from nbtask.core.handlers import autoretries, autoretry_kwargs, call_handler, exception_info
from nbtask.core.holding import Holding
from nbtask.core.refs import resolving
from nbtask.core.task import Task
from nbtask.errors import Retry, TaskPredicate
from nbtask.settings import Settings
from nbtask.wire.envelope import Signer
from nbtask.wire.events import Event, EventType
from nbtask.wire.frozen import FrozenMaker
from nbtask.wire.message import TaskMessage, decode_value
from nbtask.worker.admit import Admitted
from nbtask.worker.descriptors import DescriptorOutput
from nbtask.worker.follow_ups import FollowUps, has_handlers
from nbtask.worker.interrupts import TaskInterrupts
from nbtask.worker.outbox import Outbox
from nbtask.worker.predicates import predicate_outcome
from nbtask.worker.retry_arguments import with_retry_arguments
from nbtask.worker.settle import Outcome, failure_outcome, revoked_body, success_outcome
from nbtask.worker.slots import SlotState
from nbtask.worker.subtasks import SubtaskPublisher, WorkerSender

__all__ = ["Runner"]

log = logging.getLogger("nbtask.worker")
_make_request = FrozenMaker(Request)  # (one per task)
_BEFORE_START = ("before_start",)


#: What a terminated task's code ends with that keeps it revoked: the interrupt itself, or
#: how a task says to settle it (a revoked task is neither retried nor put back).
_ENDS_A_REVOKED_RUN = (KeyboardInterrupt, TaskPredicate, Retry)


class Runner:
    """Runs admitted tasks in this child process, one at a time, to their outcomes.

    Parameters
    ----------
    settings, transport, signer
        The child's.
    outbox
        Streams the run's events; its sequence numbers end with the outcome's.
    descriptors
        Make descriptors 1 and 2 a task's output while it runs, for a task that asks.
    publisher
        Sends the tasks a task sends while it runs.
    follow_ups
        Runs the owed follow-ups of such a task revoked ahead (never queued).
    holding, datasets
        The values this process keeps, and its named datasets.
    interrupts, slot
        The terminate interrupt, and the memory shared with the supervisor (the run's
        hard time limit).
    hostname
        The worker's, in each request.
    whoami
        What every event of the run says of the process (kept up to date by the child).
    exit_if_forked
        Ends a process the task's code forked, with the exit code of how its code ended.
    """

    def __init__(
        self,
        settings: Settings,
        transport: Transport,
        signer: Signer,
        *,
        outbox: Outbox,
        descriptors: DescriptorOutput,
        publisher: SubtaskPublisher,
        follow_ups: FollowUps,
        holding: Holding,
        datasets: DatasetCache,
        interrupts: TaskInterrupts,
        slot: SlotState,
        hostname: str,
        whoami: dict[str, Any],
        exit_if_forked: Callable[[int], None],
    ) -> None:
        self.settings = settings
        self.transport = transport
        self.signer = signer
        self.outbox = outbox
        self.descriptors = descriptors
        self.publisher = publisher
        self.follow_ups = follow_ups
        self.holding = holding
        self.datasets = datasets
        self.interrupts = interrupts
        self.slot = slot
        self.hostname = hostname
        self._whoami = whoami
        self._exit_if_forked = exit_if_forked

    def arguments(self, admitted: Admitted) -> tuple[Any, Any]:
        """The task's ``(args, kwargs)``, loaded, with the datasets it requires."""
        message = admitted.message
        with resolving(self.transport.store, self.signer, self.settings.key_prefix, self.holding):
            args, kwargs = decode_value(
                admitted.arguments,
                message.serializer,
                message.args_layout,
                self.transport.store.get_blob,
            )
        # Named datasets come from this process, never through the message.
        kwargs.update(self.datasets.values_for(message.requires or ()))
        return args, kwargs

    def request(self, admitted: Admitted, task: Task, args: Any, kwargs: Any) -> Request:
        """The run's request (``self.request``) of ``task`` for ``admitted``."""
        message, delivery = admitted.message, admitted.delivery
        # A limit in the message (set by the caller) wins; else the task's own, which a
        # task sent by name only has here.
        time_limit = message.time_limit if message.time_limit is not None else task.time_limit
        soft_limit = message.soft_time_limit
        if soft_limit is None:
            soft_limit = task.soft_time_limit
        return _make_request(
            id=message.id,
            name=message.name,
            args=tuple(args),
            kwargs=kwargs,
            queue=message.queue,
            hostname=self.hostname,
            retries=message.retries,
            eta=message.eta,
            expires=message.expires,
            time_limit=time_limit,
            soft_time_limit=soft_limit,
            parent_id=message.parent_id,
            root_id=message.root_id,
            emit=self.outbox.emit,
            blob_store=self.transport.store,
            holding=self.holding,
            signer=self.signer,
            client=message.client,
            delivery_info=_delivery_info(delivery.queue, delivery.deliveries > 0),
        )

    def run(self, admitted: Admitted, task: Task) -> Outcome:
        """Run ``task`` for ``admitted`` and return how it ended.

        The slot already names the task (with no deadline); a time limit is added here. A
        copy of this process that the task's code forked ends here, with its exit code.
        """
        message = admitted.message
        try:
            args, kwargs = self.arguments(admitted)
        except Exception as exc:
            return self.failed(message, exc, self.outbox.end())
        request = self.request(admitted, task, args, kwargs)
        if request.time_limit:  # (else the slot says so already: see Child._claim)
            self.slot.occupy(message.id, time.time() + request.time_limit)
        # The request stays current until the outcome is decided: an autoretry needs it.
        sender = WorkerSender(self.publisher, message, self.follow_ups.send)
        with running(request), task_running(task), sending_through(sender):
            try:
                if has_handlers(task, _BEFORE_START):  # (Task's own does nothing)
                    call_handler(log, task.before_start, message.id, tuple(args), kwargs)
                outcome = self._call(message, task, args, kwargs, request.soft_time_limit)
            except BaseException as exc:
                outcome = self._after_exception(message, task, exc)
        self._exit_if_forked(outcome.exit_code)
        outcome.args, outcome.kwargs, outcome.request = tuple(args), kwargs, request
        if outcome.retry_arguments is not None:  # retry(args=..., kwargs=...)
            store = self.transport.store
            return with_retry_arguments(
                admitted, outcome, self.settings.blob_threshold, store.put_blobs, self.failed
            )
        return outcome

    def _call(
        self, message: TaskMessage, task: Task, args: Any, kwargs: Any, soft_limit: float | None
    ) -> Outcome:
        # Descriptors 1 and 2 are the task's from before its interrupts can raise to after
        # they no longer can: given back whichever way its code ends. Not while a thread
        # an earlier task left running lives: what it writes there would be this task's
        # output, maybe another notebook's cell (its prints are dropped: outbox.py).
        captured = task.output_descriptors and not self.outbox.threads_left_running()
        if captured:
            self.descriptors.start()
        try:
            retval, runtime = self._run_code(task, args, kwargs, soft_limit)
        finally:
            if captured:
                self.descriptors.end()
        return self._succeeded(message, retval, runtime)

    def _run_code(
        self, task: Task, args: Any, kwargs: Any, soft_limit: float | None
    ) -> tuple[Any, float]:
        """The task's return value and how long its code ran, under its interrupts."""
        self.interrupts.start()  # raises if a terminate came while it was being set up
        if soft_limit:
            signal.setitimer(signal.ITIMER_REAL, soft_limit)
        started = time.perf_counter()
        try:
            retval = task.call_from_run(args, kwargs)
            if isinstance(retval, CoroutineType):  # an ``async def`` task: run it here
                retval = asyncio.run(retval)
        finally:
            self.interrupts.stop()
            signal.setitimer(signal.ITIMER_REAL, 0)
        return retval, time.perf_counter() - started

    def _succeeded(self, message: TaskMessage, retval: Any, runtime: float) -> Outcome:
        return success_outcome(
            message,
            retval,
            self._whoami,
            runtime,
            self.outbox.end(),
            self.settings.blob_threshold,
            self.transport.store.put_blobs,
        )

    def _after_exception(self, message: TaskMessage, task: Task, exc: BaseException) -> Outcome:
        if self.interrupts.terminated and isinstance(exc, _ENDS_A_REVOKED_RUN):
            seq = self.outbox.end()
            data = {**self._whoami, "reason": "terminated"}  # the run began: see _whoami
            event = Event(EventType.REVOKED, message.id, seq, data, run=message.run)
            return Outcome(event, revoked_body(exc), exc=exc)
        if self.interrupts.terminated:
            # The code handled the interrupt and ended with an error of its own (a cleanup
            # that failed, ``except KeyboardInterrupt: raise ValueError(...)``): that error
            # is how it ended, as in a kernel. A revoked task is not retried.
            return self.failed(message, exc, self.outbox.end(), task)
        if isinstance(exc, TaskPredicate):
            return predicate_outcome(message, exc, self.outbox.end(), self._whoami)
        if autoretries(task, exc):
            try:
                task.retry(exc=exc, **autoretry_kwargs(task))
            except BaseException as decided:
                exc = decided
        if not isinstance(exc, Retry):
            return self.failed(message, exc, self.outbox.end(), task)
        seq = self.outbox.end()
        cause = exc.exc if exc.exc is not None else exc
        data = {
            **self._whoami,  # says when the run began: a client makes its skipped STARTED
            "reason": str(cause),
            "retries": message.retries + 1,
            "eta": time.time() + exc.when,
            # Where the retry waits and runs (retry(queue=...) may name another queue):
            # its client's handle follows it there.
            "queue": exc.queue or message.queue,
        }
        outcome = Outcome(Event(EventType.RETRY, message.id, seq, data, run=message.run), exc=cause)
        outcome.einfo, outcome.retry_in = exception_info(cause), exc.when
        outcome.retry_queue = exc.queue
        if exc.new_args is not None or exc.new_kwargs is not None:
            outcome.retry_arguments = (exc.new_args, exc.new_kwargs)
        return outcome

    def failed(
        self, message: TaskMessage, exc: BaseException, seq: int, task: Task | None = None
    ) -> Outcome:
        """The outcome of ``message``'s task that raised ``exc`` (or could not be run)."""
        return failure_outcome(message, exc, seq, self._whoami, task)


def _delivery_info(queue: str, redelivered: bool) -> dict[str, Any]:
    """``self.request.delivery_info``, with Celery's keys.

    Celery's code reads ``delivery_info["routing_key"]`` for the queue a task came from:
    here it is the queue's name, as ``queue`` is. nbtask sends to queues directly (the
    default exchange, ``""``) and has no priorities (``None``).
    """
    return {
        "queue": queue,
        "routing_key": queue,
        "exchange": "",
        "priority": None,
        "redelivered": redelivered,
    }
