"""Task states and the events workers send to a client about its tasks."""

from __future__ import annotations

import dataclasses
import enum
import functools
import time
from collections.abc import Mapping
from typing import Any

from nbtask.errors import DecodeError
from nbtask.wire.blobs import BlobReader, ByteProgress, parse_layout
from nbtask.wire.envelope import Signer
from nbtask.wire.message import SERIALIZERS, decode_value

__all__ = [
    "CODE_DIFFERS",
    "FAILED_STATES",
    "FINAL_SEQ",
    "FINAL_STATES",
    "FINAL_STATE_NAMES",
    "OUTPUT_PARTS",
    "RUN_SEQ_SPAN",
    "WAITING_STATES",
    "WAITING_STATE_NAMES",
    "Deferred",
    "Event",
    "EventType",
    "Progress",
    "Run",
    "State",
    "Unloadable",
    "decode_event",
    "lacks_code",
    "run_seq_base",
]

# Sequence numbers order a task's events. Each run (first try, each retry, each
# redelivery after a worker died) numbers its events from a range of its own (see
# run_seq_base), so a later run's events are never taken for stale ones; events sent on
# a task's behalf (revoked, worker lost) use FINAL_SEQ, above all of them and still exact
# in a JavaScript number.
RUN_SEQ_SPAN = 1_000_000
FINAL_SEQ = 1 << 52
_DELIVERY_SLOTS = 64  # redeliveries numbered apart within one retry

#: Set (true) in the data of every event of a run whose worker's code of a task sent by
#: name differs from its sender's (see nbtask.core.fingerprint).
CODE_DIFFERS = "code_differs"


#: Which send of a task an event is about: the key prefix of the app that sent it, and the
#: signed ``created`` of the client's message, or the time a chain stamped and signed for
#: a later step that a worker sends (``None`` where whoever sends the event on the task's
#: behalf cannot know it). A client takes an event only for the send it made,
#: so a replayed event of an earlier task with the same id, or another app's, is refused.
Run = tuple[str, float | None]


def run_seq_base(retries: int, deliveries: int) -> int:
    """Where the events of the run ``(retries, deliveries)`` start numbering."""
    return (retries * _DELIVERY_SLOTS + min(deliveries, _DELIVERY_SLOTS - 1)) * RUN_SEQ_SPAN


class State(str, enum.Enum):
    """Where a task is in its life; the names are Celery's plus ``WORKER_LOST``."""

    PENDING = "PENDING"
    STARTED = "STARTED"
    RETRY = "RETRY"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    REVOKED = "REVOKED"
    WORKER_LOST = "WORKER_LOST"

    def __str__(self) -> str:
        return self.value


FINAL_STATES = frozenset({State.SUCCESS, State.FAILURE, State.REVOKED, State.WORKER_LOST})
#: The same as text, as a stored record's ``state`` field holds them.
FINAL_STATE_NAMES = frozenset(state.value for state in FINAL_STATES)
#: The final states in which a handle's ``failed()`` is true: Celery's is ``FAILURE`` alone
#: (a revoked task has not failed), and a lost worker is Celery's ``WorkerLostError``,
#: itself a ``FAILURE``.
FAILED_STATES = frozenset({State.FAILURE, State.WORKER_LOST})
#: The states of a record whose task's message waits, not started: sent (``PENDING``), or
#: put back by a retry (``RETRY``, until its next run starts). The one place this rule is
#: written: the store's scripts spell it from :data:`WAITING_STATE_NAMES`.
WAITING_STATES = frozenset({State.PENDING, State.RETRY})
#: The same as text, in a fixed order, as a stored record's ``state`` field holds them.
WAITING_STATE_NAMES = tuple(sorted(state.value for state in WAITING_STATES))


class EventType(str, enum.Enum):
    """Kinds of event on a client's event channel."""

    STARTED = "started"
    PROGRESS = "progress"
    STDOUT = "stdout"
    STDERR = "stderr"
    DISPLAY = "display"
    STATE = "state"
    #: On the wire only: several outputs (the kinds above) of one send, in order. A
    #: client applies and hands out its parts; callbacks never get one.
    OUTPUT = "output"
    RETRY = "retry"
    SUCCESS = "success"
    FAILURE = "failure"
    REVOKED = "revoked"
    WORKER_LOST = "worker_lost"


# By value, for reading a header without the Enum call's cost.
_EVENT_TYPES = {kind.value: kind for kind in EventType}
#: What an ``output`` event's parts can be.
OUTPUT_PARTS = frozenset({EventType.STDOUT, EventType.STDERR, EventType.DISPLAY, EventType.STATE})

_STATE_OF = {
    EventType.STARTED: State.STARTED,
    EventType.RETRY: State.RETRY,
    EventType.SUCCESS: State.SUCCESS,
    EventType.FAILURE: State.FAILURE,
    EventType.REVOKED: State.REVOKED,
    EventType.WORKER_LOST: State.WORKER_LOST,
}


@dataclasses.dataclass(frozen=True)
class Progress:
    """How far a task is (``handle.progress``, an event's progress).

    Parameters
    ----------
    done
        Units of work done so far.
    total
        Units of work in all; ``None`` when unknown.
    message
        The task's short note about it.
    """

    done: float
    total: float | None = None
    message: str = ""

    @property
    def fraction(self) -> float | None:
        """``done / total`` clipped to [0, 1], or ``None`` without a total."""
        if not self.total:
            return None
        return min(max(self.done / self.total, 0.0), 1.0)


@dataclasses.dataclass(frozen=True)
class Event:
    """One event about one task, as carried in a signed envelope's header.

    Parameters
    ----------
    type
        What happened.
    task_id
        The task it is about.
    seq
        Per-task sequence number, so a client can order and de-duplicate.
    data
        JSON-safe details: ``text`` for output, ``done/total/message`` for progress,
        ``ename/evalue/traceback`` for failures, ``worker``/``pid`` for started,
        ``parts`` (``[kind, data]`` pairs, see :meth:`parts`) for ``output``.
    timestamp
        When the worker created it (``time.time()``).
    run
        The send of the task it is about (see :data:`Run`).
    """

    type: EventType
    task_id: str
    seq: int = 0
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    timestamp: float = dataclasses.field(default_factory=time.time)
    run: Run = ("", None)

    @property
    def state(self) -> State | None:
        """The state this event moves the task into, if any."""
        return _STATE_OF.get(self.type)

    @property
    def progress(self) -> Progress | None:
        """The progress carried by a progress event."""
        if self.type is not EventType.PROGRESS:
            return None
        return Progress(
            float(self.data.get("done", 0.0)),
            None if self.data.get("total") is None else float(self.data["total"]),
            str(self.data.get("message", "")),
        )

    def parts(self) -> list[Event]:
        """The outputs an ``output`` event carries, in order; any other event alone.

        Each part is an event of its own kind (``stdout``, ``stderr``, ``display`` or
        ``state``) with this one's task, number, time and send. A part that is not one of
        these, or not shaped as one, is left out.
        """
        if self.type is not EventType.OUTPUT:
            return [self]
        found = self.data.get("parts")
        parts = []
        for part in found if isinstance(found, list) else ():
            if not (isinstance(part, list) and len(part) == 2 and isinstance(part[1], dict)):
                continue
            kind = _EVENT_TYPES.get(part[0]) if isinstance(part[0], str) else None
            if kind in OUTPUT_PARTS:
                parts.append(Event(kind, self.task_id, self.seq, part[1], self.timestamp, self.run))
        return parts

    def to_header(self) -> dict[str, Any]:
        """The JSON header that carries this event."""
        return {
            "kind": "event",
            "type": self.type.value,
            "id": self.task_id,
            "seq": self.seq,
            "ts": self.timestamp,
            "app": self.run[0],
            "sent": self.run[1],
            "data": dict(self.data),
        }

    def not_for(self, prefix: str, sent: float | None) -> str | None:
        """Why this event is not about the send of its task by app ``prefix`` at ``sent``.

        ``None`` when it is; ``sent`` ``None`` (not known here) accepts any send of the
        app's task.
        """
        app, when = self.run
        if app != prefix:
            return f"it is about a task of key prefix {app!r}, not {prefix!r}"
        if sent is not None and when != sent:
            return "it is about another send of a task with that id (an earlier one's, replayed)"
        return None

    def not_after(self, when: float | None) -> str | None:
        """Why this event cannot be an outcome made after ``when`` (epoch seconds), if so."""
        if when is None or self.timestamp >= when or self.state not in FINAL_STATES:
            return None
        return (
            "it ended more than result_ttl ago, so the record it was stored in is gone: "
            "an earlier send's outcome, put back"
        )

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> Event:
        """Rebuild an event from a verified header.

        Raises
        ------
        DecodeError
            The header is not a well-formed event.
        """
        if header.get("kind") != "event":
            raise DecodeError("not an event header")
        data = header.get("data", {})
        if not isinstance(data, dict):
            raise DecodeError("event data is not an object")
        try:
            kind, sent = header["type"], header.get("sent")
            return cls(
                _EVENT_TYPES.get(kind) or EventType(kind),  # (a list: TypeError)
                str(header["id"]),
                int(header.get("seq", 0)),
                data,
                float(header.get("ts", 0.0)),
                (str(header.get("app", "")), None if sent is None else float(sent)),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise DecodeError(f"malformed event header: {exc!r}") from None


@dataclasses.dataclass(frozen=True)
class Deferred:
    """A verified result sent out of band, not loaded yet: its blobs stay where they are.

    Loading reads the blobs (checking each against its signed digest) and unpickles:
    done by whoever asks for the value (``handle.get()``), on that thread, once.
    """

    body: bytes
    serializer: str
    layout: object
    fetch: BlobReader

    @property
    def size(self) -> int:
        """The result's pickled size in bytes: what loading it moves."""
        return sum(part.size for part in parse_layout(self.layout) or ())

    def load(self, progress: ByteProgress | None = None) -> Any:
        """The value; raises what loading raises (a missing or altered blob, a class).

        ``progress`` is told how many bytes arrived as its blobs are read.
        """
        fetch = self.fetch if progress is None else functools.partial(self.fetch, progress=progress)
        return decode_value(self.body, self.serializer, self.layout, fetch)


@dataclasses.dataclass(frozen=True)
class Unloadable:
    """A verified result that cannot be loaded in this process.

    ``why``: the exception, as ``Type: message``; ``missing``: whether loading it failed
    for a module or class it names that this process lacks (:func:`lacks_code`), rather
    than while rebuilding the value from its state.
    """

    why: str
    missing: bool = True

    @classmethod
    def of(cls, exc: BaseException) -> Unloadable:
        """What loading a value that raised ``exc`` says."""
        return cls(f"{type(exc).__name__}: {exc}", lacks_code(exc))


# How pickle says a module it imported has no such name (3.11-3.13, and 3.14).
_NO_SUCH_NAME = ("Can't get attribute ", "Can't resolve path ")


def lacks_code(exc: BaseException) -> bool:
    """Whether unpickling raised ``exc`` for a module or a name in one missing here.

    An import that fails, or a module without the class or function the pickle names
    (another version of it); not an error raised while the value is rebuilt from its
    state, where its class is here (``__setstate__``, slots that do not match).
    """
    if isinstance(exc, ImportError):
        return True
    return isinstance(exc, AttributeError) and str(exc).startswith(_NO_SUCH_NAME)


def decode_event(signer: Signer, raw: bytes, fetch: BlobReader | None = None) -> tuple[Event, Any]:
    """Verify and decode one event; the body (a result) is unpickled only after the MAC.

    A result that verifies but cannot be loaded here (a class only the worker can import)
    comes back as :class:`Unloadable`, so the task still ends, with an error that says so.
    A result sent out of band (the event's ``layout`` names its blobs) comes back as
    :class:`Deferred`, loaded through ``fetch`` only when asked for.

    Raises
    ------
    SignatureError
        The event does not verify.
    DecodeError
        It verifies but is malformed.
    """
    envelope = signer.open(raw)
    event = Event.from_header(envelope.header)
    result = None
    # A result kept wholly out of band leaves the body empty: its layout names it.
    layout = event.data.get("layout")
    has_value = bool(envelope.body) or layout is not None
    # A task stopped while it ran may send what it did before (a notebook cell's names).
    kinds = (EventType.SUCCESS, EventType.FAILURE, EventType.REVOKED)
    if event.type in kinds and has_value:
        serializer = str(event.data.get("serializer", "cloudpickle"))
        if serializer not in SERIALIZERS:
            raise DecodeError(f"event names an unknown serializer {serializer!r}")
        if layout is not None and fetch is not None:
            parse_layout(layout)  # malformed: refused now, with the event
            return event, Deferred(bytes(envelope.body), serializer, layout, fetch)
        try:
            result = decode_value(envelope.body, serializer, layout, fetch)
        except Exception as exc:
            result = Unloadable.of(exc)
    return event, result
