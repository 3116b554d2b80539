"""Task messages: the typed header, the body layout, and building one from a task call.

The body of a task envelope is three parts, so a worker can load each separately::

    code (the task pickled by value, or empty) | callbacks (pickle, or empty) | arguments

``code_len`` and ``callbacks_len`` in the header give the split. Arguments are a
cloudpickle of ``(args, kwargs)``, or JSON with ``serializer="json"``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
import uuid
from collections.abc import Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

from nbtask.brokers import Publish
from nbtask.envelope import Buffer, Envelope, Signer, dumps
from nbtask.errors import ConfigurationError, SerializationError

if TYPE_CHECKING:
    from nbtask.canvas import Signature
    from nbtask.task import Task

__all__ = [
    "SERIALIZERS",
    "Callbacks",
    "TaskMessage",
    "build_message",
    "decode_value",
    "encode_value",
    "to_publish",
]

SERIALIZERS = ("cloudpickle", "json")


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
    callbacks_len: int = 0
    retries: int = 0
    time_limit: float | None = None
    soft_time_limit: float | None = None
    reject_on_worker_lost: bool | None = None
    serializer: str = "cloudpickle"
    parent_id: str | None = None
    root_id: str | None = None
    store_result: bool = True

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
        if values.get("serializer", "cloudpickle") not in SERIALIZERS:
            raise ValueError("field 'serializer' names no known serializer")
        return cls(**values)

    def to_header(self) -> dict[str, Any]:
        """The JSON header carrying this message."""
        return {"kind": "task", **{name: getattr(self, name) for name, _, _ in _MESSAGE_FIELDS}}

    def split(self, envelope: Envelope) -> tuple[Buffer, Buffer, Buffer]:
        """``(code, callbacks, arguments)`` parts of a verified envelope's body."""
        body = envelope.body
        end = self.code_len + self.callbacks_len
        return body[: self.code_len], body[self.code_len : end], body[end:]


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


@dataclasses.dataclass(frozen=True)
class Callbacks:
    """Signatures to send when the task succeeds (``link``) or fails (``link_error``)."""

    link: tuple[Signature, ...] = ()
    link_error: tuple[Signature, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.link or self.link_error)


def encode_value(value: Any, serializer: str, what: str) -> bytes:
    """Serialise arguments or a result; ``what`` names it in the error."""
    try:
        if serializer == "json":
            return json.dumps(value, separators=(",", ":")).encode()
        return dumps(value)
    except Exception as exc:
        raise SerializationError(f"{what} cannot be serialised with {serializer}: {exc}") from None


def decode_value(data: Buffer, serializer: str) -> Any:
    """Load what :func:`encode_value` made; only call on a verified envelope's body."""
    if serializer == "json":
        return json.loads(bytes(data))
    return Envelope({}, data).load_body()


def code_for(
    task: Task, cache: MutableMapping[Task, tuple[str, bytes]]
) -> tuple[str | None, bytes]:
    """``(digest, pickled task)`` for tasks workers cannot import by name, else ``(None, b"")``.

    Module-level tasks of importable modules travel by name; tasks defined in ``__main__``
    (a notebook, a script) or inside a function travel by value, pickled once per task.
    """
    if not type(task).__module__ or _importable(task):  # "" marks send_task's stand-ins
        return None, b""
    cached = cache.get(task)
    if cached is None:
        try:
            code = dumps(task)
        except Exception as exc:
            raise SerializationError(
                f"task {task.name!r} cannot be shipped to workers: {exc}"
            ) from None
        cached = (hashlib.sha256(code).hexdigest()[:32], code)
        cache[task] = cached
    return cached


def _importable(task: Task) -> bool:
    cls = type(task)
    module = sys.modules.get(cls.__module__)
    if module is None or cls.__module__ == "__main__":
        return False
    target: Any = module
    for part in cls.__qualname__.split("."):
        target = getattr(target, part, None)
    return target is task


def build_message(
    task: Task,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    *,
    signer: Signer,
    channel: str,
    queue: str,
    code_cache: MutableMapping[Task, tuple[str, bytes]],
    options: Mapping[str, Any],
) -> tuple[TaskMessage, bytes]:
    """Build and sign the message for one call of ``task``.

    ``options`` may hold ``task_id, eta, expires, retries, time_limit, soft_time_limit,
    parent_id, root_id, callbacks`` (a :class:`Callbacks`).
    """
    digest, code = code_for(task, code_cache)
    serializer = getattr(task, "serializer", "cloudpickle")
    if serializer not in SERIALIZERS:
        raise ConfigurationError(f"unknown serializer {serializer!r}; use one of {SERIALIZERS}")
    try:
        payload = encode_value((list(args), dict(kwargs)), serializer, "arguments")
    except SerializationError:
        raise SerializationError(unpicklable_message(task.name, args, kwargs, serializer)) from None
    callbacks: Callbacks | None = options.get("callbacks")
    links = encode_value(callbacks, "cloudpickle", "callbacks") if callbacks else b""
    task_id = options.get("task_id") or uuid.uuid4().hex
    message = TaskMessage(
        id=task_id,
        name=task.name,
        queue=queue,
        client=channel,
        created=time.time(),
        eta=options.get("eta"),
        expires=options.get("expires"),
        acks_late=bool(task.acks_late),
        ignore_result=bool(options.get("ignore_result", task.ignore_result)),
        module=type(task).__module__,
        code=digest,
        code_len=len(code),
        callbacks_len=len(links),
        retries=int(options.get("retries", 0)),
        time_limit=options.get("time_limit", getattr(task, "time_limit", None)),
        soft_time_limit=options.get("soft_time_limit", getattr(task, "soft_time_limit", None)),
        reject_on_worker_lost=getattr(task, "reject_on_worker_lost", None),
        serializer=serializer,
        parent_id=options.get("parent_id"),
        root_id=options.get("root_id") or task_id,
        store_result=bool(getattr(task, "store_result", True)),
    )
    return message, signer.seal(message.to_header(), (code, links, payload))


def to_publish(message: TaskMessage, raw: bytes) -> Publish:
    """What the broker needs to enqueue ``message``, with its PENDING record."""
    record = {"state": "PENDING", "name": message.name, "client": message.client}
    return Publish(message.queue, message.id, raw, record, message.eta)


def unpicklable_message(
    name: str, args: Sequence[Any], kwargs: Mapping[str, Any], serializer: str
) -> str:
    """Name the first argument that cannot be serialised, and say what to do."""
    labelled = [(f"argument {i}", a) for i, a in enumerate(args)]
    labelled += [(f"argument {k!r}", v) for k, v in kwargs.items()]
    for label, value in labelled:
        try:
            encode_value(value, serializer, label)
        except SerializationError as exc:
            return (
                f"{label} of task {name!r} ({type(value).__name__}) cannot be sent: {exc}. "
                "Pass something serialisable instead (e.g. a path or a plain value) and open "
                "the resource inside the task"
            )
    return f"the arguments of task {name!r} cannot be serialised with {serializer}"
