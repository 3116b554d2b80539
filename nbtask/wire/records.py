"""Typed records kept in the store: a task's record and a worker's registry entry.

Both are plain bookkeeping that anyone with broker access can overwrite, so both are
parsed defensively here, in one place: a field that is missing, of the wrong type, not
UTF-8 or absurdly nested reads as absent, and never raises. Only the signed ``result``
of a task record is ever trusted, and only after its signature verifies.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from nbtask._process import Place
from nbtask.wire.events import FINAL_STATES, State

__all__ = [
    "FOLLOW_UPS",
    "FOLLOW_UPS_OWED",
    "MAX_INFO_BYTES",
    "MAX_PLAIN_BYTES",
    "MAX_REVOKE_BYTES",
    "PARKED",
    "RECORD_FIELDS",
    "REQUEUED_COPY",
    "RecordFields",
    "TaskRecord",
    "WorkerInfo",
    "final_fields",
    "json_object",
    "pending_fields",
]

#: A record as written: field name -> text or bytes (the signed result).
RecordFields = dict[str, str | bytes]
#: A worker's registry entry is a few hundred bytes: a larger one was not written by nbtask.
MAX_INFO_BYTES = 64 * 1024
#: A record's plain fields (all but its signed result) are short texts: a larger one was
#: not written by nbtask, and is not read.
MAX_PLAIN_BYTES = 64 * 1024
#: A client's signed revoke kept in a task's record (``revoked``) is some 260 bytes, under
#: 600 with the longest reason, a 64-character id and a 100-character key prefix: a larger
#: one was not written by nbtask. It is not read, let alone checked: it is deleted as
#: forged, and the task runs.
MAX_REVOKE_BYTES = 8 * 1024


_PENDING = State.PENDING.value

#: The record field saying what follows an outcome nbtask stated on a task's behalf (lost,
#: killed, dead-lettered, refused unrun, revoked before it started), a failure with
#: errbacks or later chain steps, or a success with callbacks or a chain's next step:
#: :data:`FOLLOW_UPS_OWED` until one process holding the task's message takes it
#: (``Store.take_follow_ups``) to send them (or fail the chain's later steps), once, as
#: the signed outcome beside it says. Absent from the records of other outcomes. A plain
#: field anyone with write access can set again: what it makes a worker send is bounded by
#: the verified outcome, and by the message's ``max_age``, as a rerun of the task is.
FOLLOW_UPS = "follow_ups"
FOLLOW_UPS_OWED = "owed"
#: The record field naming the retry (its number, the retried message's ``retries``) last
#: parked for the task: a retry is parked once per task and retry number, so the same
#: retry's end sent again (its reply lost after the store ran it) is neither told nor
#: parked again (see ``PARKED_BEFORE`` in nbtask.brokers.scripts); and an earlier copy
#: of the task's message (a replay) does not start (see ``CHECK_START`` there).
PARKED = "parked"
#: The record field naming the copy a ``Reject(requeue=True)`` last put back,
#: ``"<retries>:<rejects>"`` of its signed header. With :data:`PARKED` it lets the start
#: check refuse an earlier copy (a replay of one that ran already): see ``CHECK_START``
#: in nbtask.brokers.scripts.
REQUEUED_COPY = "requeued"


def pending_fields(
    name: str, client: str, queue: str, sent: float, label: str = ""
) -> RecordFields:
    """The fields of a task's record when its message is sent (``label`` only when given).

    ``sent`` is the message's ``created``, for events sent on the task's behalf by those
    who have only its record (see nbtask.wire.events.Run).
    """
    fields: RecordFields = {
        "state": _PENDING,
        "name": name,
        "client": client,
        "queue": queue,
        "sent": repr(sent),
    }
    if label:
        fields["label"] = label
    return fields


def final_fields(state: State, result: bytes, at: float) -> RecordFields:
    """The fields of a task's record once it ended (or is to be retried).

    ``result`` is the signed event that ended it (empty for a retry, whose record keeps
    no result); ``at`` is that event's time, so the record and the event (a handle's
    ``finished_at``) give one time, not two read moments apart.
    """
    fields: RecordFields = {"state": state.value, "finished_at": repr(at)}
    if result:
        fields["result"] = result
    return fields


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else ""


def _number(value: object) -> float | None:
    try:
        return float(_text(value))
    except ValueError:
        return None


#: The fields of a record that :meth:`TaskRecord.parse` reads: a reader reads no others.
RECORD_FIELDS = (
    "state",
    "name",
    "client",
    "queue",
    "worker",
    "pid",
    "consumer",
    "started_at",
    "finished_at",
    "result",
    "label",
    "sent",
)


@dataclasses.dataclass(frozen=True)
class TaskRecord:
    """A task's stored record, read from the store.

    Attributes
    ----------
    state : State or None
        The plain state field (``None`` when missing or not a known state). Unsigned: a
        hint for displays, never proof of anything.
    name, client, queue : str
        The task's name, the event channel of the client that sent it, and the queue it
        was sent to.
    worker, pid, consumer : str
        Who marked it STARTED.
    label : str
        How the call was named on screen when sent (a notebook cell's name or first
        line); empty when none was given, and in records written by earlier versions of
        nbtask, which kept none. Unsigned: shown only, with control characters replaced.
    started_at, finished_at : float or None
        Epoch seconds.
    sent : float or None
        The ``created`` of the task's message (``None`` in records of earlier versions).
        Unsigned: events sent on the task's behalf name it, and only its own client,
        which knows the real one, checks it.
    result : bytes or None
        The signed final event (verify before use).
    """

    state: State | None = None
    name: str = ""
    client: str = ""
    queue: str = ""
    worker: str = ""
    pid: str = ""
    consumer: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    result: bytes | None = None
    label: str = ""
    sent: float | None = None

    @classmethod
    def parse(cls, fields: Mapping[Any, Any]) -> TaskRecord | None:
        """A record from a hash's fields (keys bytes or str); ``None`` when empty."""
        if not fields:
            return None
        plain = {_text(k): v for k, v in fields.items()}
        state_text = _text(plain.get("state", b""))
        try:
            state: State | None = State(state_text)
        except ValueError:
            state = None
        result = plain.get("result")
        return cls(
            state=state,
            name=_text(plain.get("name", b"")),
            client=_text(plain.get("client", b"")),
            queue=_text(plain.get("queue", b"")),
            worker=_text(plain.get("worker", b"")),
            pid=_text(plain.get("pid", b"")),
            consumer=_text(plain.get("consumer", b"")),
            started_at=_number(plain.get("started_at", b"")),
            finished_at=_number(plain.get("finished_at", b"")),
            result=bytes(result) if isinstance(result, (bytes, bytearray)) and result else None,
            label=_text(plain.get("label", b"")),
            sent=_number(plain.get("sent", b"")),
        )

    @property
    def final(self) -> bool:
        """The state field says the task ended."""
        return self.state in FINAL_STATES


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """A live worker as it announces itself in the registry at every heartbeat."""

    hostname: str
    pid: int
    queues: tuple[str, ...]
    concurrency: int
    consumers: tuple[str, ...]
    started: float = 0.0
    tasks: tuple[str, ...] = ()
    #: The ids of the tasks its children run (the non-empty ones of :attr:`running`).
    busy: tuple[str, ...] = ()
    #: When this entry was written (epoch seconds): the worker's last heartbeat.
    seen: float = 0.0
    #: Public names of the secrets it accepts (:func:`nbtask.wire.envelope.key_id`).
    keys: tuple[str, ...] = ()
    #: The process id of each consumer's child (0 while none runs), in order.
    pids: tuple[int, ...] = ()
    #: The named datasets it holds (see :mod:`nbtask.core.datasets`).
    datasets: tuple[str, ...] = ()
    #: The id of the task each consumer's child runs ("" while idle), in order; empty in
    #: an entry from an older nbtask, which did not say which child runs what.
    running: tuple[str, ...] = ()
    #: The kind of broker it serves (:func:`nbtask.brokers.broker_kind`); "" in an entry
    #: from an older nbtask, which did not say.
    broker: str = ""
    #: The boot id of its host's kernel (Linux; "" elsewhere, and in an entry from an
    #: older nbtask): with the hostname, tells whether its process is one of this host's.
    boot: str = ""
    #: Its pid namespace (Linux; "" elsewhere, and in an entry from an older nbtask): a
    #: container's pids name other processes outside it.
    pid_space: str = ""
    #: When its process started, in clock ticks since its host booted (Linux; 0 elsewhere,
    #: and in an entry from an older nbtask): tells it from a later process given its pid,
    #: whatever the wall clock did since (:attr:`started` is the wall clock's).
    start_ticks: int = 0

    @property
    def place(self) -> Place:
        """Where its supervisor runs: whether its :attr:`pid` can be looked up here."""
        return Place(self.hostname, self.boot, self.pid_space)

    def verifiable_with(self, accepted: Sequence[str]) -> bool:
        """True if a worker accepting the secrets ``accepted`` names verifies all this one did.

        Every message this worker took was signed with one of the secrets :attr:`keys`
        names. An entry naming none (from an older nbtask) cannot be judged: True.
        """
        return set(self.keys) <= set(accepted)

    def to_json(self) -> str:
        """The registry entry's text."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def parse(cls, raw: object) -> WorkerInfo | None:
        """An entry read from the registry; ``None`` for anything that is not one."""
        value = json_object(raw, MAX_INFO_BYTES)
        if value is None:
            return None
        try:
            return cls(
                hostname=_field(value, "hostname", str),
                pid=_field(value, "pid", int),
                queues=_strings(value.get("queues")),
                concurrency=_field(value, "concurrency", int),
                consumers=_strings(value.get("consumers")),
                started=float(_field(value, "started", (int, float), 0.0)),
                tasks=_strings(value.get("tasks", [])),
                busy=_strings(value.get("busy", [])),
                seen=float(_field(value, "seen", (int, float), 0.0)),
                keys=_strings(value.get("keys", [])),
                pids=_ints(value.get("pids", [])),
                datasets=_strings(value.get("datasets", [])),
                running=_strings(value.get("running", [])),
                broker=_field(value, "broker", str, ""),
                boot=_field(value, "boot", str, ""),
                pid_space=_field(value, "pid_space", str, ""),
                start_ticks=_field(value, "start_ticks", int, 0),
            )
        except (TypeError, ValueError, OverflowError):  # JSON integers have no bound
            return None


def json_object(raw: object, max_bytes: int) -> dict[str, Any] | None:
    """A JSON object read from unsigned bookkeeping; ``None`` for anything that is not one.

    Parameters
    ----------
    raw
        What the store gave back: ``bytes`` or ``str`` (anything else is not an object).
    max_bytes
        Longer text is refused unread: anyone with broker access may write these keys.
    """
    data = raw.encode() if isinstance(raw, str) else raw
    if not isinstance(data, (bytes, bytearray)) or len(data) > max_bytes:
        return None
    try:
        value = json.loads(bytes(data).decode("utf-8"))
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested too deep
        return None
    return value if isinstance(value, dict) else None


def _field(data: Mapping[str, Any], name: str, kind: Any, default: Any = None) -> Any:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(name)
    return value


def _ints(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise TypeError("not a list of integers")
    return tuple(value)


def _strings(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError("not a list of strings")
    return tuple(value)
