"""A worker's child process.

It takes one message at a time, verifies it, runs the task under its limits, streams its
output and progress, reports the outcome, sends linked tasks, and calls the handlers.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import signal
import sys
import time
import traceback
import weakref
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any

from nbtask._process import die_with_parent
from nbtask.brokers import Delivery, open_broker
from nbtask.canvas import Signature
from nbtask.envelope import Buffer, Envelope, Signer
from nbtask.errors import (
    BrokerUnavailable,
    NbtaskError,
    NotRegistered,
    Retry,
    SerializationError,
    SoftTimeLimitExceeded,
)
from nbtask.events import FINAL_SEQ, RUN_SEQ_SPAN, Event, EventType, State
from nbtask.message import (
    Callbacks,
    TaskMessage,
    build_message,
    decode_value,
    encode_value,
    to_publish,
)
from nbtask.outbox import Outbox, TaskStream
from nbtask.sender import WorkerSender
from nbtask.settings import Settings
from nbtask.slots import SlotState
from nbtask.task import ExceptionInfo, Request, Task, _current

__all__ = ["Child"]

log = logging.getLogger("nbtask.worker")


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


class Child:
    """The loop of one child process (created by the supervisor, run after fork)."""

    def __init__(
        self,
        settings: Settings,
        url: str,
        secret: str | None,
        *,
        queues: Sequence[str],
        consumer: str,
        worker_id: str,
        hostname: str,
        tasks: Mapping[str, Task],
        slot: SlotState,
    ) -> None:
        self.settings = settings
        self.url = url
        self.secret = secret
        self.queues = list(queues)
        self.consumer = consumer
        self.worker_id = worker_id
        self.hostname = hostname
        self.tasks = dict(tasks)
        self.slot = slot
        self._shipped: dict[str, Task] = {}
        self._code_cache: weakref.WeakKeyDictionary[Task, tuple[str, bytes]] = (
            weakref.WeakKeyDictionary()
        )
        self._stop = False
        self._running = False
        self._terminated = False
        self._whoami: dict[str, Any] = {"worker": hostname}

    def run(self) -> None:
        """Serve messages until SIGTERM (finishing the current task first)."""
        die_with_parent(signal.SIGKILL)
        # A process group of its own: Ctrl-C in a terminal reaches only the supervisor,
        # so SIGINT here always means "terminate the running task".
        os.setpgid(0, 0)
        signal.signal(signal.SIGINT, self._on_interrupt)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGALRM, self._on_alarm)
        self.broker = open_broker(self.settings, self.url)
        self.signer = Signer.for_settings(self.settings, self.secret)
        self.outbox = Outbox(self.broker, self.signer)
        self._whoami["pid"] = os.getpid()
        backoff = 0.1
        delivery: Delivery | None = None
        # A message already taken is always handled, even once asked to stop.
        while not self._stop or delivery is not None:
            try:
                if delivery is None:
                    delivery = self.broker.fetch(self.queues, self.consumer, 1.0)
                backoff = 0.1
                if delivery is not None:
                    # Handled exactly once, whatever happens: handle() may return the
                    # next message, taken with its last write (one round trip).
                    taken, delivery = delivery, None
                    delivery = self.handle(taken)
            except BrokerUnavailable as exc:
                log.warning("broker unreachable (%s); retrying in %.1f s", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:
                # Never lose the worker slot to one bad message: log and carry on.
                log.exception("unexpected error while handling a message; continuing")

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        self._stop = True

    def _on_interrupt(self, signum: int, frame: FrameType | None) -> None:
        # Only the supervisor sends SIGINT: terminate the task this slot holds. If it has
        # not started running yet, it never will (see handle()).
        self._terminated = True
        if self._running:
            raise KeyboardInterrupt("task terminated (revoked)")

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        if self._running:
            raise SoftTimeLimitExceeded("the task ran past its soft time limit")

    # One delivery ----------------------------------------------------------------------------
    def handle(self, delivery: Delivery) -> Delivery | None:
        """Verify, run and report one delivery; return the next one if it came along."""
        # The task is STARTED from the moment it was delivered: claim the slot now, so a
        # terminate request finds this child even before the task begins to run.
        self._terminated = False
        if delivery.verdict == "OK" and delivery.task_id:
            self.slot.occupy(delivery.task_id, 0.0)
        try:
            return self._handle(delivery)
        finally:
            self.slot.clear()

    def _handle(self, delivery: Delivery) -> Delivery | None:
        try:
            envelope = self.signer.open(delivery.raw)
            message = TaskMessage.from_header(envelope.header)
            if delivery.task_id is not None and delivery.task_id != message.id:
                raise ValueError("the queue entry names another task than the message")
        except (NbtaskError, ValueError) as exc:
            log.error(
                "rejected message %s on queue %s: %s; moved to the dead-letter stream",
                delivery.delivery_id, delivery.queue, exc,
            )  # fmt: skip
            self.broker.dead_letter(delivery)
            if delivery.verdict == "OK" and delivery.task_id:
                self._report_unverifiable(delivery.task_id, exc)
            return None
        code, callbacks_raw, arguments = message.split(envelope)
        # First whether it may start at all: a duplicate or replay of a finished task
        # must leave that task's record as it is.
        if delivery.verdict is None:
            record = {"worker": self.hostname, "pid": str(os.getpid())}
            refused = self.broker.start(message.id, record)
        else:
            refused = None if delivery.verdict == "OK" else delivery.verdict
        if refused is not None:
            log.warning("dropped a message for task %s: it is already %s", message.id, refused)
            self.broker.discard(delivery)
            if refused == State.REVOKED.value:
                gone = Outcome(
                    Event(EventType.REVOKED, message.id, FINAL_SEQ, {"reason": "revoked"})
                )
                self._after_outcome(message, gone, callbacks_raw, None)
            return None
        now = time.time()
        if message.eta is None and now - message.created > self.settings.replay_window:
            log.error("rejected task %s: sent %.0f s ago, older than max_age", message.id,
                      now - message.created)  # fmt: skip
            self.broker.dead_letter(delivery)
            too_old = _failure(message.id, FINAL_SEQ, NbtaskError(
                f"the message was {now - message.created:.0f} s old, older than max_age "
                f"({self.settings.replay_window:.0f} s); it was not run"
            ))  # fmt: skip
            return self._settle(None, message, Outcome(too_old))
        if message.expires is not None and now > message.expires:
            expired = Outcome(
                Event(EventType.REVOKED, message.id, FINAL_SEQ, {"reason": "expired"})
            )
            following = self._settle(delivery, message, expired)
            self._after_outcome(message, expired, callbacks_raw, None)
            return following
        try:
            task: Task | None = self._resolve(message, code)
        except Exception as exc:
            task, resolve_error = None, exc
        if task is not None and self._rate_limited(delivery, message, task):
            return None
        self.outbox.begin(
            message.id, message.client, self._whoami, first_seq=message.retries * RUN_SEQ_SPAN
        )
        self.slot.occupy(message.id, 0.0)
        if task is None:
            outcome = self._failed(message, resolve_error, self.outbox.end())
        elif self._terminated:
            event = Event(
                EventType.REVOKED, message.id, self.outbox.end(), {"reason": "terminated"}
            )
            outcome = Outcome(event)
        else:
            outcome = self._execute(delivery, message, task, arguments)
        # Callbacks and handlers run after the outcome is stored; only without them may
        # the last write also wait for the next message (which would delay them).
        later = bool(callbacks_raw) or (task is not None and _has_handlers(task))
        following = self._settle(delivery, message, outcome, envelope, fetch_next=not later)
        self._after_outcome(message, outcome, callbacks_raw, task)
        return following

    def _after_outcome(
        self, message: TaskMessage, outcome: Outcome, callbacks_raw: Buffer, task: Task | None
    ) -> None:
        """Send linked tasks (or fail a chain's later steps), then call the handlers."""
        try:
            callbacks = decode_value(callbacks_raw, "cloudpickle") if callbacks_raw else None
            if callbacks:
                self._send_callbacks(message, outcome, callbacks)
        except Exception:
            # e.g. a callback argument whose class this worker cannot import. The task's
            # own outcome is stored; the chain's later steps cannot be told who they are.
            log.exception("could not send the callbacks of task %s", message.id)
        if task is not None:
            self._call_handlers(task, message, outcome)

    def _report_unverifiable(self, task_id: str, exc: BaseException) -> None:
        """Settle a task whose message failed verification (it was marked STARTED)."""
        channel = self.broker.get_record(task_id).get("client", b"").decode()
        if not channel:
            # No client sent this task: the id beside the message was forged, and the
            # record is the start check's alone.
            self.broker.forget_unsent(task_id)
            return
        event = _failure(task_id, FINAL_SEQ, NbtaskError(
            f"the message for this task failed verification and was not run: {exc}"
        ))  # fmt: skip
        raw = self.signer.seal(event.to_header())
        record: dict[str, str | bytes] = {
            "state": State.FAILURE.value, "result": raw, "finished_at": repr(time.time()),
        }  # fmt: skip
        self.broker.finish(None, task_id, channel, raw, record)

    def _rate_limited(self, delivery: Delivery, message: TaskMessage, task: Task) -> bool:
        """Put a task over its rate limit back for later, without holding this slot."""
        if task.rate_limit is None or self.settings.worker_disable_rate_limits:
            return False
        wait = self.broker.rate_wait(f"{self.worker_id}:{message.name}", task.rate_limit)
        if wait <= 0:
            return False
        # Back to PENDING (the start check may have marked it STARTED) and parked.
        self.broker.finish(delivery, message.id, message.client, b"", {"state": "PENDING"},
                           requeue=(delivery.raw, time.time() + wait))  # fmt: skip
        return True

    def _execute(
        self, delivery: Delivery, message: TaskMessage, task: Task, arguments: Buffer
    ) -> Outcome:
        # A limit in the message (set by the caller) wins; else the task's own, which a
        # task sent by name only has here.
        time_limit = message.time_limit if message.time_limit is not None else task.time_limit
        soft_limit = message.soft_time_limit
        if soft_limit is None:
            soft_limit = task.soft_time_limit
        self.slot.occupy(message.id, time.time() + time_limit if time_limit else 0.0)
        token = None
        saved = sys.stdout, sys.stderr
        args: Any = ()
        kwargs: Any = {}
        try:
            args, kwargs = decode_value(arguments, message.serializer)
            request = Request(
                id=message.id, name=message.name, args=tuple(args), kwargs=kwargs,
                queue=message.queue, hostname=self.hostname, retries=message.retries,
                eta=message.eta, expires=message.expires, time_limit=time_limit,
                soft_time_limit=soft_limit, parent_id=message.parent_id,
                root_id=message.root_id, emit=self.outbox.emit,
                sender=WorkerSender(self, message),
                delivery_info={"queue": delivery.queue, "redelivered": delivery.deliveries > 0},
            )  # fmt: skip
            token = _current.set(request)
            sys.stdout = TaskStream(self.outbox, EventType.STDOUT)
            sys.stderr = TaskStream(self.outbox, EventType.STDERR)
            _call_handler(task.before_start, message.id, tuple(args), kwargs)
            self._running = True
            if self._terminated:  # a terminate that came while the task was being set up
                raise KeyboardInterrupt("task terminated (revoked)")
            if soft_limit:
                signal.setitimer(signal.ITIMER_REAL, soft_limit)
            started = time.perf_counter()
            try:
                retval = task.run(*args, **kwargs)
            finally:
                self._running = False
                signal.setitimer(signal.ITIMER_REAL, 0)
            outcome = self._succeeded(message, retval, time.perf_counter() - started)
        except BaseException as exc:
            outcome = self._after_exception(message, task, exc)
        finally:
            sys.stdout, sys.stderr = saved
            if token is not None:
                _current.reset(token)
        outcome.args, outcome.kwargs = tuple(args), kwargs
        return outcome

    def _succeeded(self, message: TaskMessage, retval: Any, runtime: float) -> Outcome:
        seq = self.outbox.end()
        try:
            body = encode_value(retval, message.serializer, f"the result of task {message.name!r}")
        except SerializationError as exc:
            return self._failed(message, exc, seq)
        data = {**self._whoami, "runtime": runtime, "serializer": message.serializer}
        return Outcome(Event(EventType.SUCCESS, message.id, seq, data), body, retval=retval)

    def _after_exception(self, message: TaskMessage, task: Task, exc: BaseException) -> Outcome:
        if self._terminated:
            seq = self.outbox.end()
            event = Event(EventType.REVOKED, message.id, seq, {"reason": "terminated"})
            return Outcome(event, exc=exc)
        if (
            not isinstance(exc, Retry)
            and task.autoretry_for
            and isinstance(exc, task.autoretry_for)
        ):
            try:
                task.retry(exc=exc)
            except BaseException as decided:
                exc = decided
        if isinstance(exc, Retry):
            seq = self.outbox.end()
            cause = exc.exc if exc.exc is not None else exc
            data = {
                "reason": str(cause),
                "retries": message.retries + 1,
                "eta": time.time() + exc.when,
            }
            outcome = Outcome(Event(EventType.RETRY, message.id, seq, data), exc=cause)
            outcome.einfo, outcome.retry_in = _einfo(cause), exc.when
            return outcome
        return self._failed(message, exc, self.outbox.end())

    def _failed(self, message: TaskMessage, exc: BaseException, seq: int) -> Outcome:
        event = _failure(message.id, seq, exc, self._whoami)
        return Outcome(event, exc=exc, einfo=_einfo(exc))

    def _settle(
        self,
        delivery: Delivery | None,
        message: TaskMessage,
        outcome: Outcome,
        envelope: Envelope | None = None,
        *,
        fetch_next: bool = False,
    ) -> Delivery | None:
        """Store the outcome, tell the client and acknowledge (re-sending a retry).

        With ``fetch_next`` (and unless the child is stopping) the same round trip also
        waits for the next message.
        """
        try:
            raw = self.signer.seal(outcome.event.to_header(), outcome.body)
        except NbtaskError as exc:
            outcome.event, outcome.body = _failure(message.id, outcome.event.seq, exc), b""
            raw = self.signer.seal(outcome.event.to_header())
        state = outcome.event.state
        assert state is not None
        record: dict[str, str | bytes] = {"state": state.value, "finished_at": repr(time.time())}
        if message.ignore_result and state is State.SUCCESS:
            # The outcome is still signed in the store; only the value is left out.
            kept = {**outcome.event.data, "result_kept": False}
            record["result"] = self.signer.seal({**outcome.event.to_header(), "data": kept})
        elif state is not State.RETRY:
            record["result"] = raw
        if not message.store_result and state is not State.RETRY:
            record = {}  # backend=None: the client is told, the store keeps nothing
        requeue = None
        if outcome.retry_in is not None and envelope is not None:
            due = time.time() + outcome.retry_in
            header = {**message.to_header(), "retries": message.retries + 1, "eta": due,
                      "created": time.time()}  # fmt: skip
            requeue = (self.signer.seal(header, envelope.body), due)
        then_fetch = (self.queues, self.consumer, 1.0) if fetch_next and not self._stop else None
        backoff = 0.1
        while True:
            # The task has run: its outcome is written, however long the broker is away
            # (giving up would leave the message to be settled as if the worker died).
            try:
                return self.broker.finish(
                    delivery, message.id, message.client, raw, record, requeue=requeue,
                    then_fetch=then_fetch,
                )  # fmt: skip
            except BrokerUnavailable as exc:
                log.warning("cannot store the outcome of task %s yet (%s); retrying in %.1f s",
                            message.id, exc, backoff)  # fmt: skip
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                then_fetch = None

    # After the outcome -----------------------------------------------------------------------
    def _send_callbacks(self, message: TaskMessage, outcome: Outcome, callbacks: Callbacks) -> None:
        """Send ``link`` signatures on success, ``link_error`` ones on failure."""
        state = outcome.event.state
        if state is State.SUCCESS:
            calls = [(sig, () if sig.immutable else (outcome.retval,)) for sig in callbacks.link]
        elif state in (State.FAILURE, State.REVOKED):
            calls = [(sig, () if sig.immutable else (message.id,)) for sig in callbacks.link_error]
            # Later steps of a chain will never run: tell their handles why, now.
            self._fail_downstream(message, outcome, callbacks.link)
        else:
            return
        family = {"parent_id": message.id, "root_id": message.root_id}
        self.publish(message.client, [
            Signature(sig.task, (*first, *sig.args), sig.kwargs, {**sig.options, **family})
            for sig, first in calls
        ])  # fmt: skip

    def publish(self, channel: str, sigs: Sequence[Signature]) -> list[str]:
        """Send signatures (with their final arguments) for ``channel``'s client; their ids."""
        publishes = []
        for sig in sigs:
            options = dict(sig.options)
            if options.get("countdown") is not None:
                options["eta"] = time.time() + float(options["countdown"])
            queue = options.get("queue") or sig.task.queue or self.settings.default_queue
            sent, raw = build_message(
                sig.task, sig.args, sig.kwargs, signer=self.signer, channel=channel,
                queue=queue, code_cache=self._code_cache, options=options,
            )  # fmt: skip
            publishes.append(to_publish(sent, raw))
        if publishes:
            self.broker.publish(publishes)
        return [p.task_id for p in publishes]

    def _fail_downstream(
        self, message: TaskMessage, outcome: Outcome, links: Sequence[Signature]
    ) -> None:
        for sig in links:
            task_id = sig.options.get("task_id")
            if not task_id:
                continue
            data = {
                **outcome.event.data,
                "reason": f"an earlier task in the chain ({message.id}) did not succeed",
            }
            event = Event(outcome.event.type, task_id, FINAL_SEQ, data)
            raw = self.signer.seal(event.to_header())
            assert event.state is not None
            self.broker.finish(
                None, task_id, message.client, raw, {"state": event.state.value, "result": raw}
            )
            nested = sig.options.get("callbacks")
            if isinstance(nested, Callbacks):
                self._fail_downstream(message, outcome, nested.link)

    def _call_handlers(self, task: Task, message: TaskMessage, outcome: Outcome) -> None:
        """Celery's handlers, in Celery's order, after the outcome is stored."""
        state = outcome.event.state
        args, kwargs = outcome.args, outcome.kwargs
        if state is State.SUCCESS:
            _call_handler(task.on_success, outcome.retval, message.id, args, kwargs)
        elif state is State.RETRY and outcome.exc is not None and outcome.einfo is not None:
            _call_handler(task.on_retry, outcome.exc, message.id, args, kwargs, outcome.einfo)
        elif outcome.exc is not None and outcome.einfo is not None:
            _call_handler(task.on_failure, outcome.exc, message.id, args, kwargs, outcome.einfo)
        if state is None or state is State.RETRY:
            return  # Celery skips after_return for a retry: the task has not returned yet
        retval = outcome.retval if state is State.SUCCESS else outcome.exc
        _call_handler(
            task.after_return, state.value, retval, message.id, args, kwargs, outcome.einfo
        )

    # Finding the task ------------------------------------------------------------------------
    def _resolve(self, message: TaskMessage, code: Buffer) -> Task:
        if message.code is not None:
            task = self._shipped.get(message.code)
            if task is None:
                # One instance per process for shipped tasks too, keyed by code digest.
                task = decode_value(code, "cloudpickle")
                self._shipped[message.code] = task
            return task
        task = self.tasks.get(message.name)
        if task is None:
            task = self._import(message)
        return task

    def _import(self, message: TaskMessage) -> Task:
        if not message.module:
            raise NotRegistered(self._unknown(message, "it was sent by name only"))
        try:
            module = importlib.import_module(message.module)
        except ImportError as exc:
            why = f"importing {message.module!r} failed: {exc}"
            raise NotRegistered(self._unknown(message, why)) from None
        for value in vars(module).values():
            if isinstance(value, Task) and not type(value).is_abstract():
                self.tasks.setdefault(value.name, value)
        task = self.tasks.get(message.name)
        if task is None:
            why = f"module {message.module!r} defines no such task"
            raise NotRegistered(self._unknown(message, why))
        return task

    def _unknown(self, message: TaskMessage, why: str) -> str:
        known = ", ".join(sorted(self.tasks)) or "none"
        return (
            f"task {message.name!r} is not registered on worker {self.hostname} ({why}). "
            f"Registered tasks: {known}. Start the worker with -A for the module that defines "
            "it, and import it under the same path on both sides ('proj.tasks' and 'tasks' "
            "are different names)"
        )


_AFTER_HANDLERS = ("on_success", "on_failure", "on_retry", "after_return")


def _has_handlers(task: Task) -> bool:
    """True if the task's class overrides any handler that runs after the outcome."""
    return any(getattr(type(task), name) is not getattr(Task, name) for name in _AFTER_HANDLERS)


def _call_handler(handler: Any, *args: Any) -> None:
    # A failing handler must not lose the task's (already stored) outcome: log it only.
    try:
        handler(*args)
    except Exception:
        log.exception("handler %s raised; the task's outcome is unaffected", handler.__name__)


def _einfo(exc: BaseException) -> ExceptionInfo:
    return ExceptionInfo(
        exc, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    )


def _failure(
    task_id: str, seq: int, exc: BaseException, details: Mapping[str, Any] | None = None
) -> Event:
    tb = exc.__traceback__
    # Skip the worker's own frames: the remote traceback starts in the user's code.
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        tb = tb.tb_next
    # No user frame at all (e.g. NotRegistered): the message says everything.
    text = "".join(traceback.format_exception(type(exc), exc, tb)) if tb is not None else ""
    kind = type(exc)
    data = {
        **(details or {}),
        "ename": kind.__name__,
        "etype": f"{kind.__module__}.{kind.__qualname__}",
        "evalue": str(exc),
        "traceback": text,
    }
    return Event(EventType.FAILURE, task_id, seq, data)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
