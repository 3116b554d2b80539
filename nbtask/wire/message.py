"""Task messages: the typed header, the body layout, and how values are serialised.

The body of a task envelope is three parts, so a worker can load each separately::

    code (the task pickled by value, or empty) | callbacks (pickle, or empty) | arguments

``code_len`` and ``callbacks_len`` in the header give the split. Arguments are a
cloudpickle of ``(args, kwargs)``, or JSON with ``serializer="json"``. Large arguments are
split (:mod:`nbtask.wire.blobs`): ``args_layout`` then says which parts are inline, in the
arguments region, and which are blobs.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from nbtask.errors import DecodeError, NbtaskError, SerializationError
from nbtask.settings import MAX_SECONDS
from nbtask.wire.blobs import Fetch, Part, SplitValue, join_value, parse_layout, split_value
from nbtask.wire.envelope import Buffer, Envelope, dumps
from nbtask.wire.frozen import FrozenMaker

__all__ = [
    "LATEST_TIME",
    "SERIALIZERS",
    "LayoutJSON",
    "TaskMessage",
    "decode_value",
    "encode_value",
    "make_message",
    "split",
]

SERIALIZERS = ("cloudpickle", "json")
#: The latest time (epoch seconds) a message may name, and minus it the earliest: the
#: end of year 9999, past which a ``datetime`` cannot show it (an eta ten thousand years
#: off is a slip, or an attack). ``datetime.max`` ("never") is this, as a float rounds
#: it. An eta in the past means "now".
LATEST_TIME = 253402300800.0
# Each time field (epoch seconds) and duration field (seconds), with its bounds. A limit
# is bounded as a setting is (about 31 years): past about 9.2e9 s the worker could not
# even set a soft one (OverflowError in the task's process).
_TIME_BOUNDS = (
    *((name, -LATEST_TIME, LATEST_TIME) for name in ("created", "eta", "expires", "sent")),
    *((name, 0.0, MAX_SECONDS) for name in ("time_limit", "soft_time_limit")),
)
#: A value's layout as the header carries it (see :mod:`nbtask.wire.blobs`).
LayoutJSON = list[Any]
#: A list of names, as the header carries it.
Names = list[str]


@dataclasses.dataclass(frozen=True)
class TaskMessage:
    """The verified header of a task message, typed."""

    id: str
    name: str
    #: The key prefix of the app that sent it and the queue it was sent to: a message
    #: copied to another app's keys or another queue is refused there.
    prefix: str
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
    callbacks_len: int = 0
    retries: int = 0
    time_limit: float | None = None
    soft_time_limit: float | None = None
    reject_on_worker_lost: bool | None = None
    serializer: str = "cloudpickle"
    parent_id: str | None = None
    root_id: str | None = None
    store_result: bool = True
    args_layout: LayoutJSON | None = None
    #: Named datasets the task receives from its worker (see nbtask.core.datasets).
    requires: Names | None = None
    #: Where the task goes instead when it was sent to one worker process's own queue
    #: (see nbtask.core.holding) and that process is gone before taking it.
    fallback_queue: str | None = None
    #: How the call is named on screen (a notebook cell's name or first line), kept in
    #: its record for a restarted kernel's ``%tasks``. Workers before it ignore it.
    label: str | None = None
    #: A task sent by name: a digest of its code as the sender has it loaded, for the
    #: worker to tell when its own copy differs (see nbtask.core.fingerprint).
    fingerprint: str | None = None
    #: The send a message made by a worker on a client's behalf continues (a chain's
    #: later step): a time its client chose and signed in the chain, and so knows, for its
    #: handle. ``None``: the send is this message's own ``created``.
    sent: float | None = None
    #: How many times a ``Reject(requeue=True)`` put this task back: the worker that puts
    #: it back signs the count in the message, so no unsigned store entry decides when it
    #: stops. Workers before it ignore it.
    rejects: int = 0

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> TaskMessage:
        """Check field types; raise :class:`~nbtask.errors.DecodeError` naming a bad field."""
        if header.get("kind") != "task":
            raise DecodeError("not a task message")
        # The header's own fields, not every field: a plain call's header leaves most out.
        values: dict[str, Any] = {}
        for name, value in header.items():
            kinds = _FIELD_KINDS.get(name)
            if kinds is None:
                continue  # "kind", or a field of a later nbtask: ignored
            # JSON gives exactly these types; anything else is checked in full. bool is an
            # int subclass: accept it only where a bool is expected.
            if type(value) not in kinds and (
                not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
            ):
                raise DecodeError(f"field {name!r} has a wrong type")
            values[name] = value
        if not values.keys() >= _REQUIRED_SET:
            missing = next(name for name in _REQUIRED if name not in values)
            raise DecodeError(f"field {missing!r} is missing")
        _check_times(values)
        requires = values.get("requires")
        if requires and not all(isinstance(n, str) for n in requires):
            raise DecodeError("field 'requires' is not a list of names")
        if values.get("serializer", "cloudpickle") not in SERIALIZERS:
            raise DecodeError("field 'serializer' names no known serializer")
        if cls is TaskMessage:  # (every task a worker runs comes here)
            return make_message(**values)
        return cls(**values)

    def to_header(self) -> dict[str, Any]:
        """The JSON header carrying this message; fields at their defaults are left out.

        :meth:`from_header` gives them their defaults again, as any nbtask does: a header
        a third smaller for a plain call, to encode, send, decode and check.
        """
        # The instance's dict holds exactly its fields, in their order.
        header = {"kind": "task", **self.__dict__}
        for name, default in _DEFAULTS:
            value = header[name]
            if value is default or (type(value) is type(default) and value == default):
                del header[name]
        return header

    @property
    def run(self) -> tuple[str, float]:
        """Which send of the task this is (its events name it: see nbtask.wire.events.Run)."""
        return self.prefix, self.created if self.sent is None else self.sent

    def sent_elsewhere(self, prefix: str, queue: str) -> str | None:
        """Why this message may not be taken from ``queue`` of the app ``prefix``, if so.

        ``None`` when it was sent there: a copy under another app's keys, or on another
        queue, is refused.
        """
        if self.prefix == prefix and self.queue == queue:
            return None
        return f"the message was sent to key prefix {self.prefix!r}, queue {self.queue!r}, not here"

    def split(self, envelope: Envelope) -> tuple[Buffer, Buffer, Buffer]:
        """``(code, callbacks, arguments)`` parts of a verified envelope's body."""
        body = envelope.body
        end = self.code_len + self.callbacks_len
        return body[: self.code_len], body[self.code_len : end], body[end:]


def _check_times(values: Mapping[str, Any]) -> None:
    """Refuse a time or duration that is NaN, infinite, negative or past its bound.

    JSON as Python reads it takes ``NaN``, ``Infinity`` and integers of any size: a NaN
    ``created`` never ages past ``max_age``, and an integer no float holds raises
    ``OverflowError`` wherever a worker computes with it.
    """
    for name, least, most in _TIME_BOUNDS:
        value = values.get(name)
        # Compared as they are: an int too large for a float compares without converting.
        if value is not None and not least <= value <= most:
            raise DecodeError(f"field {name!r} is not a time nbtask can keep: {value!r:.40}")


def _field_kinds(spec: str) -> tuple[type, ...]:
    names = {
        "str": (str,),
        "float": (int, float),
        "bool": (bool,),
        "int": (int,),
        "None": (type(None),),
        "LayoutJSON": (list,),
        "Names": (list,),
    }
    return tuple(kind for part in spec.split("|") for kind in names[part.strip()])


# (name, accepted types, required) for each TaskMessage field, computed once.
_MESSAGE_FIELDS = tuple(
    (f.name, _field_kinds(str(f.type)), f.default is dataclasses.MISSING)
    for f in dataclasses.fields(TaskMessage)
)
# Accepted types by field name; the required fields' names, in order.
_FIELD_KINDS = {name: kinds for name, kinds, _ in _MESSAGE_FIELDS}
_REQUIRED = tuple(name for name, _, required in _MESSAGE_FIELDS if required)
_REQUIRED_SET = frozenset(_REQUIRED)
#: Makes a TaskMessage as ``TaskMessage(...)`` does, without its setattr per field (per task).
make_message = FrozenMaker(TaskMessage)
# (name, default) of each TaskMessage field that has one.
_DEFAULTS = tuple(
    (f.name, f.default)
    for f in dataclasses.fields(TaskMessage)
    if f.default is not dataclasses.MISSING
)


def encode_value(value: Any, serializer: str, what: str) -> bytes:
    """Serialise arguments or a result; ``what`` names it in the error."""
    try:
        if serializer == "json":
            return json.dumps(value, separators=(",", ":")).encode()
        return dumps(value)
    except NbtaskError:
        raise  # nbtask's own refusal (a handle whose task has not succeeded) says it all
    except Exception as exc:
        raise SerializationError(f"{what} cannot be serialised with {serializer}: {exc}") from None


def split(value: Any, serializer: str, what: str, threshold: int) -> SplitValue:
    """Serialise arguments or a result into parts, the large ones as blobs (cloudpickle)."""
    if serializer == "json":
        data = encode_value(value, serializer, what)
        return SplitValue([Part(len(data))], [data], {})  # JSON stays inline, whatever its size
    try:
        return split_value(value, threshold)
    except NbtaskError:
        raise
    except Exception as exc:
        raise SerializationError(f"{what} cannot be serialised with {serializer}: {exc}") from None


def decode_value(
    data: Buffer, serializer: str, layout: object = None, fetch: Fetch | None = None
) -> Any:
    """Load what :func:`encode_value` or :func:`split` made; only from a verified envelope.

    ``layout`` is the header's layout (``None``: ``data`` is the whole value) and ``fetch``
    returns a blob's bytes.
    """
    if serializer == "json":
        return json.loads(bytes(data))
    return join_value(parse_layout(layout), data, fetch)
