"""A worker's child process.

It takes one message at a time, verifies it, runs the task, streams its output and
progress, and reports the outcome.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from nbtask._process import die_with_parent
from nbtask.brokers import Broker, Delivery, open_broker
from nbtask.envelope import Envelope, Signer, dumps
from nbtask.errors import BrokerUnavailable, NbtaskError, NotRegistered
from nbtask.events import Event, EventType, State
from nbtask.settings import Settings
from nbtask.task import Request, Task, _current

__all__ = ["Child", "TaskMessage"]

log = logging.getLogger("nbtask.worker")
_FLUSH_SECONDS = 1 / 15  # the widget repaints at most ~15 times a second anyway
_FINAL_SEQ = 1 << 30  # above any event a child sends; used by the supervisor too


@dataclasses.dataclass(frozen=True)
class TaskMessage:
    """The verified header of a task message, typed."""

    id: str
    name: str
    queue: str
    client: str
    created: float
    eta: float | None
    expires: float | None
    acks_late: bool
    ignore_result: bool
    module: str
    code: str | None
    code_len: int
    retries: int = 0

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> TaskMessage:
        """Check field types; raise ``ValueError`` naming the first bad field."""
        if header.get("kind") != "task":
            raise ValueError("not a task message")
        values: dict[str, Any] = {}
        for name, kinds, required in _MESSAGE_FIELDS:
            if name not in header:
                if required:
                    raise ValueError(f"field {name!r} is missing")
                continue
            value = header[name]
            # bool is an int subclass: accept it only where a bool is expected.
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise ValueError(f"field {name!r} has a wrong type")
            values[name] = value
        return cls(**values)


def _field_kinds(spec: str) -> tuple[type, ...]:
    names = {
        "str": (str,),
        "float": (int, float),
        "bool": (bool,),
        "int": (int,),
        "None": (type(None),),
    }
    return tuple(kind for part in spec.split("|") for kind in names[part.strip()])


# (name, accepted types, required) for each TaskMessage field, computed once.
_MESSAGE_FIELDS = tuple(
    (f.name, _field_kinds(str(f.type)), f.default is dataclasses.MISSING)
    for f in dataclasses.fields(TaskMessage)
)


class Outbox:
    """Buffers a running task's events and sends them ~15 times a second.

    Output is concatenated and progress is coalesced (the latest value wins). The
    ``started`` event goes out with the first flush, about 1/15 s into the task; a task
    that ends sooner skips it (its final event names the worker). Everything buffered is
    flushed before the final event, so nothing a task printed is lost.
    """

    def __init__(self, broker: Broker, signer: Signer) -> None:
        self._broker = broker
        self._signer = signer
        self._lock = threading.Lock()
        self._task_id = ""
        self._channel = ""
        self._seq = 0
        self._started: Event | None = None
        # Output in the order produced: stdout/stderr text (adjacent chunks merged) and
        # rich displays. Progress is kept apart because only its latest value matters.
        self._output: list[tuple[EventType, dict[str, Any]]] = []
        self._progress: dict[str, Any] | None = None
        self._wake = threading.Event()
        threading.Thread(target=self._pump, name="nbtask-outbox", daemon=True).start()

    def begin(self, task_id: str, channel: str, details: Mapping[str, Any]) -> None:
        """Start buffering for a task that was just marked STARTED."""
        with self._lock:
            self._task_id, self._channel, self._seq = task_id, channel, 1
            self._output, self._progress = [], None
            self._started = Event(EventType.STARTED, task_id, 1, details)
        self._wake.set()

    def emit(self, kind: str, data: Mapping[str, Any]) -> None:
        """Queue an event from task code: ``progress`` (coalesced) or ``display``.

        ``display`` data is a MIME bundle: ``{"data": {mime: value}, "metadata": {...}}``
        (optionally ``"transient"``); it keeps its place among printed text.
        """
        if kind == EventType.PROGRESS.value:
            with self._lock:
                self._progress = dict(data)
        elif kind == EventType.DISPLAY.value:
            with self._lock:
                self._output.append((EventType.DISPLAY, dict(data)))
        else:
            raise ValueError(f"tasks cannot send {kind!r} events")
        self._wake.set()

    def write(self, kind: EventType, text: str) -> None:
        """Queue output text."""
        with self._lock:
            if self._output and self._output[-1][0] is kind:
                self._output[-1][1]["text"] += text
            else:
                self._output.append((kind, {"text": text}))
        self._wake.set()

    def end(self) -> int:
        """Flush what the task left and return the sequence number for its final event."""
        with self._lock:
            self._started = None
        self.flush()
        with self._lock:
            self._seq += 1
            return self._seq

    def flush(self) -> None:
        """Send what is buffered now."""
        with self._lock:
            events = [] if self._started is None else [self._started]
            self._started = None
            for kind, data in self._output:
                self._seq += 1
                events.append(Event(kind, self._task_id, self._seq, data))
            if self._progress is not None:
                self._seq += 1
                events.append(Event(EventType.PROGRESS, self._task_id, self._seq, self._progress))
            self._output, self._progress = [], None
            channel = self._channel
        if not events:
            return
        raws = [self._signer.seal(e.to_header()) for e in events]
        try:
            self._broker.emit(channel, raws)
        except BrokerUnavailable as exc:
            log.warning("could not send %d event(s) of task %s: %s", len(raws), self._task_id, exc)

    def _pump(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(_FLUSH_SECONDS)
            self._wake.clear()
            self.flush()


class _Stream(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` inside a task: text goes to the client."""

    def __init__(self, outbox: Outbox, kind: EventType) -> None:
        self._outbox, self._kind = outbox, kind

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._outbox.write(self._kind, text)
        return len(text)


class Child:
    """The loop of one child process (created by the supervisor, run after fork)."""

    def __init__(
        self,
        settings: Settings,
        url: str,
        secret: str | None,
        queues: Sequence[str],
        consumer: str,
        hostname: str,
        tasks: Mapping[str, Task],
    ) -> None:
        self.settings = settings
        self.url = url
        self.secret = secret
        self.queues = list(queues)
        self.consumer = consumer
        self.hostname = hostname
        self.tasks = dict(tasks)
        self._shipped: dict[str, Task] = {}
        self._stop = False
        self._whoami: dict[str, Any] = {"worker": hostname}

    def run(self) -> None:
        """Serve messages until SIGTERM (finishing the current task first)."""
        die_with_parent(signal.SIGKILL)
        # Ctrl-C in a terminal reaches the whole process group: only the supervisor acts.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_term)
        self.broker = open_broker(self.settings, self.url)
        self.signer = Signer(
            self.secret, max_bytes=self.settings.max_message_bytes, insecure=self.settings.insecure
        )
        self.outbox = Outbox(self.broker, self.signer)
        self._whoami["pid"] = os.getpid()
        backoff = 0.1
        while not self._stop:
            try:
                delivery = self.broker.fetch(self.queues, self.consumer, 1.0)
                backoff = 0.1
            except BrokerUnavailable as exc:
                log.warning("broker unreachable (%s); retrying in %.1f s", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if delivery is not None:
                self.handle(delivery)

    def _on_term(self, signum: int, frame: object) -> None:
        self._stop = True

    def handle(self, delivery: Delivery) -> None:
        """Verify, run and report one delivery."""
        try:
            envelope = self.signer.open(delivery.raw)
            message = TaskMessage.from_header(envelope.header)
        except (NbtaskError, ValueError) as exc:
            log.error(
                "rejected message %s on queue %s: %s; moved to the dead-letter stream",
                delivery.delivery_id,
                delivery.queue,
                exc,
            )
            self.broker.dead_letter(delivery)
            return
        now = time.time()
        if message.eta is None and now - message.created > self.settings.replay_window:
            log.error(
                "rejected task %s: sent %.0f s ago, older than max_age",
                message.id,
                now - message.created,
            )
            self.broker.dead_letter(delivery)
            return
        if message.expires is not None and now > message.expires:
            self._report(
                delivery,
                message,
                Event(EventType.REVOKED, message.id, _FINAL_SEQ, {"reason": "expired"}),
            )
            return
        record = {"worker": self.hostname, "pid": str(os.getpid()), "started_at": repr(now)}
        refused = self.broker.start(message.id, record)
        if refused is not None:
            log.warning("dropped a message for task %s: it is already %s", message.id, refused)
            self.broker.discard(delivery)
            return
        self.outbox.begin(message.id, message.client, self._whoami)
        final, body = self._execute(delivery, message, envelope)
        self._report(delivery, message, final, body)

    def _execute(
        self, delivery: Delivery, message: TaskMessage, envelope: Envelope
    ) -> tuple[Event, bytes]:
        seq = 0
        try:
            task = self._resolve(message, envelope)
            args, kwargs = _loads(envelope.body[message.code_len :])
            request = Request(
                id=message.id,
                name=message.name,
                args=tuple(args),
                kwargs=kwargs,
                queue=message.queue,
                hostname=self.hostname,
                retries=message.retries,
                eta=message.eta,
                emit=self.outbox.emit,
                delivery_info={"queue": delivery.queue, "redelivered": delivery.deliveries > 0},
            )
            token = _current.set(request)
            saved = sys.stdout, sys.stderr
            sys.stdout = _Stream(self.outbox, EventType.STDOUT)
            sys.stderr = _Stream(self.outbox, EventType.STDERR)
            try:
                started = time.perf_counter()
                result = task.run(*args, **kwargs)
                runtime = time.perf_counter() - started
            finally:
                sys.stdout, sys.stderr = saved
                _current.reset(token)
            seq = self.outbox.end()
            return Event(EventType.SUCCESS, message.id, seq, {"runtime": runtime}), dumps(result)
        except BaseException as exc:
            seq = seq or self.outbox.end()
            return _failure(message.id, seq, exc), b""

    def _resolve(self, message: TaskMessage, envelope: Envelope) -> Task:
        if message.code is not None:
            task = self._shipped.get(message.code)
            if task is None:
                # One instance per process for shipped tasks too, keyed by code digest.
                task = _loads(envelope.body[: message.code_len])
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
            raise NotRegistered(
                self._unknown(message, f"importing {message.module!r} failed: {exc}")
            ) from None
        for value in vars(module).values():
            if isinstance(value, Task) and not getattr(value, "abstract", True):
                self.tasks.setdefault(value.name, value)
        task = self.tasks.get(message.name)
        if task is None:
            raise NotRegistered(
                self._unknown(message, f"module {message.module!r} defines no such task")
            )
        return task

    def _unknown(self, message: TaskMessage, why: str) -> str:
        known = ", ".join(sorted(self.tasks)) or "none"
        return (
            f"task {message.name!r} is not registered on worker {self.hostname} ({why}). "
            f"Registered tasks: {known}. Start the worker with -A for the module that defines "
            "it, and import it under the same path on both sides ('proj.tasks' and 'tasks' "
            "are different names)"
        )

    def _report(
        self, delivery: Delivery, message: TaskMessage, final: Event, body: bytes = b""
    ) -> None:
        try:
            raw = self.signer.seal(final.to_header(), body)
        except NbtaskError as exc:
            final = _failure(message.id, final.seq, exc)
            raw = self.signer.seal(final.to_header())
        assert final.state is not None
        record: dict[str, str | bytes] = {
            "state": final.state.value,
            "finished_at": repr(time.time()),
        }
        if not (message.ignore_result and final.state is State.SUCCESS):
            record["result"] = raw
        self.broker.finish(delivery, message.id, message.client, raw, record)


def _loads(data: bytes) -> Any:
    # Only ever called on the body of an envelope whose MAC verified.
    return Envelope({}, data).load_body()


def _failure(
    task_id: str, seq: int, exc: BaseException, details: Mapping[str, Any] | None = None
) -> Event:
    tb = exc.__traceback__
    # Skip the worker's own frames: the remote traceback starts in the user's code.
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        tb = tb.tb_next
    # No user frame at all (e.g. NotRegistered): the message says everything.
    text = "".join(traceback.format_exception(type(exc), exc, tb)) if tb is not None else ""
    data = {**(details or {}), "ename": type(exc).__name__, "evalue": str(exc), "traceback": text}
    return Event(EventType.FAILURE, task_id, seq, data)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
