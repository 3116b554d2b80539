"""Building outgoing task messages: from a call of a task to signed bytes to enqueue.

Shared by the client (:class:`~nbtask.App`) and by workers (a chain's next step, a task
sent from inside a task), so a message is built in one place.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import sys
import time
import types
import weakref
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from nbtask.brokers.base import Store
from nbtask.brokers.handoffs import Publish
from nbtask.core.canvas import Call, Callbacks, Signable
from nbtask.core.captured import Capture, capture
from nbtask.core.fingerprint import code_fingerprint
from nbtask.core.holding import is_holder_queue
from nbtask.core.named import importable
from nbtask.core.options import new_task_id
from nbtask.core.placement import Moving, holder_queue_for
from nbtask.core.refs import ValueRef, blobs_of, noting_refs
from nbtask.core.task import Task
from nbtask.errors import ConfigurationError, SerializationError
from nbtask.settings import Settings
from nbtask.wire.blobs import SplitValue, argument_keeper
from nbtask.wire.envelope import Signer, dumps
from nbtask.wire.message import SERIALIZERS, TaskMessage, encode_value, make_message, split
from nbtask.wire.records import pending_fields

__all__ = [
    "MessageBuilder",
    "ShippedCode",
    "as_task",
    "code_for",
    "to_publish",
    "unpicklable_message",
]


@dataclasses.dataclass(frozen=True)
class ShippedCode:
    """A task pickled by value: its digest, its bytes, and what they hold (``None``: unknown)."""

    digest: str
    code: bytes
    captured: Capture | None


def code_for(task: Task, cache: MutableMapping[Task, ShippedCode]) -> tuple[str | None, bytes]:
    """``(digest, pickled task)`` for tasks workers cannot import by name, else ``(None, b"")``.

    Module-level tasks of importable modules travel by name; tasks defined in ``__main__``
    (a notebook, a script) or inside a function travel by value, with the globals, closure
    cells and defaults their code reads as they are now. The pickle is kept and sent again
    while all of those are the same objects (see :mod:`nbtask.core.captured`); a task that
    reads a value which can change in place (a list, a DataFrame) is pickled on every send.
    """
    if not type(task).__module__:  # "" marks stand-ins sent by name
        return None, b""
    # The pickle kept first: telling a task importable scans its module (tens of
    # microseconds on every send of a class-based task, such as a notebook's cells).
    cached = cache.get(task)
    if cached is not None and cached.captured is not None and cached.captured.unchanged():
        return cached.digest, cached.code
    if importable(task):
        return None, b""
    captured = capture(task)  # before pickling: a change in between only costs a new pickle
    try:
        code = dumps(task)
    except Exception as exc:
        culprit = _unpicklable_read(task)
        why = str(exc) if culprit is None else f"it reads {culprit}, which cannot be pickled: {exc}"
        raise SerializationError(
            f"task {task.name!r} cannot be shipped to workers: {why}. Create such a resource "
            "inside the task (a connection, a lock, an open file), or define the task in a "
            "module the workers import"
        ) from None
    shipped = ShippedCode(hashlib.sha256(code).hexdigest()[:32], code, captured)
    cache[task] = shipped
    return shipped.digest, shipped.code


def _unpicklable_read(task: Task) -> str | None:
    """``the global 'lock' (lock)``: what a task's own functions read that cannot be pickled."""
    for cls in type(task).__mro__:
        if cls.__module__.split(".")[0] in ("nbtask", "builtins"):
            continue
        for attribute in vars(cls).values():
            function = getattr(attribute, "__func__", attribute)
            code = getattr(function, "__code__", None)
            if code is None:
                continue
            namespace = getattr(function, "__globals__", {})
            reads = [(f"the global {n!r}", namespace[n]) for n in _names(code) if n in namespace]
            closure = getattr(function, "__closure__", None) or ()
            cells = zip(code.co_freevars, closure, strict=False)
            reads += [(f"the variable {n!r} of its closure", c.cell_contents) for n, c in cells]
            for label, value in reads:
                try:
                    dumps(value)
                except Exception:
                    return f"{label} ({type(value).__name__})"
    return None


def _names(code: types.CodeType) -> list[str]:
    """The global names ``code`` and the functions defined in it may read."""
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names += _names(const)
    return list(dict.fromkeys(names))


class MessageBuilder:
    """Builds the signed messages of task calls, for one client's channel or for any.

    Parameters
    ----------
    signer
        Signs every message.
    settings
        The default queue, ``task_ignore_result`` and ``blob_threshold``.
    store
        Where large arguments go, out of band (without one, everything travels inline).
    through_apps
        Whether a task given a kept value goes to the process holding it, as the task's
        app sees the live workers. ``False`` for a worker's chain steps and callbacks:
        the app of a module the worker imported was never connected in that process
        (connecting one without a broker would start an embedded cluster there).
    """

    def __init__(
        self,
        signer: Signer,
        settings: Settings,
        store: Store | None = None,
        *,
        through_apps: bool = True,
    ) -> None:
        self.signer = signer
        self.settings = settings
        self.store = store
        self.through_apps = through_apps
        # Tasks pickled by value, kept while what they read is unchanged; weak so a
        # redefined task's entry goes away.
        self._code: weakref.WeakKeyDictionary[Task, ShippedCode] = weakref.WeakKeyDictionary()
        # The arguments of a call without any, per serializer: the same bytes every time.
        self._no_arguments: dict[str, SplitValue] = {}

    def build(self, call: Call, channel: str) -> tuple[TaskMessage, Publish]:
        """The message for one ``(task, args, kwargs, options)`` call of ``channel``'s client.

        ``options`` (message options, see :meth:`~nbtask.Task.send_options`) may hold
        ``queue, task_id, eta, countdown, expires, retries, time_limit, soft_time_limit,
        parent_id, root_id, label, callbacks`` (a :class:`~nbtask.core.canvas.Callbacks`),
        ``sent`` (see :attr:`TaskMessage.sent <nbtask.wire.message.TaskMessage>`).
        """
        signable, args, kwargs, options = call
        task = as_task(signable)
        option = options.get  # (read a dozen times, for every task sent)
        requires = option("requires", task.requires)
        digest, code = code_for(task, self._code)
        serializer = getattr(task, "serializer", "cloudpickle")
        if serializer not in SERIALIZERS:
            raise ConfigurationError(f"unknown serializer {serializer!r}; use one of {SERIALIZERS}")
        settings = self.settings
        threshold = settings.blob_threshold if self.store is not None else sys.maxsize
        callbacks: Callbacks | None = option("callbacks")
        if args or kwargs or callbacks:
            with noting_refs() as carried:
                try:
                    payload = self._split(args, kwargs, serializer, threshold)
                except SerializationError:
                    why = unpicklable_message(task.name, args, kwargs, serializer)
                    raise SerializationError(why) from None
                in_arguments = list(carried)
                links = encode_value(callbacks, "cloudpickle", "callbacks") if callbacks else b""
        else:  # nothing to pickle, so no reference to note: the same bytes every time
            payload, in_arguments, links = self._no_arguments_of(serializer, threshold), [], b""
        # Task.send_options chose the queue (the call's, the task's, a dataset's holders,
        # the routes); without a choice, the process holding a kept value among the
        # arguments (unless it is busy and moving the value beats waiting), else the
        # default queue.
        queue = (
            option("queue")
            or task.queue
            or (self._holder_queue(task, in_arguments, requires) if in_arguments else None)
            or settings.default_queue
        )
        task_id = option("task_id") or new_task_id()
        if self.store is not None and payload.blobs:
            # Kept until the task has ended (the worker releases them then), or result_ttl.
            self.store.put_blobs(payload.blobs, keeper=argument_keeper(task_id))
        if self.store is not None and in_arguments:
            # Kept values passed by reference: the task may load them after they are released.
            self.store.pin_blobs(blobs_of(in_arguments))
        ignore_result = task.ignore_result
        if ignore_result is None:
            ignore_result = settings.task_ignore_result
        now = time.time()
        countdown = option("countdown")
        message = make_message(
            id=task_id,
            name=task.name,
            prefix=settings.key_prefix,
            queue=queue,
            client=channel,
            created=now,
            eta=now + float(countdown) if countdown is not None else option("eta"),
            expires=option("expires"),
            acks_late=bool(task.acks_late),
            ignore_result=bool(option("ignore_result", ignore_result)),
            module=type(task).__module__ or getattr(task, "_sent_module", ""),
            code=digest,
            code_len=len(code),
            callbacks_len=len(links),
            retries=int(option("retries", 0)),
            time_limit=option("time_limit", task.time_limit),
            soft_time_limit=option("soft_time_limit", task.soft_time_limit),
            reject_on_worker_lost=task.reject_on_worker_lost,
            serializer=serializer,
            parent_id=option("parent_id"),
            root_id=option("root_id") or task_id,
            store_result=bool(task.store_result),
            args_layout=payload.layout_json,
            requires=list(requires) or None,
            fallback_queue=(
                option("fallback_queue") or settings.default_queue
                if is_holder_queue(queue)
                else None
            ),
            label=option("label"),
            fingerprint=code_fingerprint(task) if digest is None else None,
            sent=option("sent"),
        )
        raw = self.signer.seal(message.to_header(), (code, links, *payload.inline))
        return message, to_publish(message, raw)

    def _split(
        self, args: Sequence[Any], kwargs: Mapping[str, Any], serializer: str, threshold: int
    ) -> SplitValue:
        """The arguments serialised, in parts (see :func:`~nbtask.wire.message.split`)."""
        if args or kwargs:
            return split((list(args), dict(kwargs)), serializer, "arguments", threshold)
        return self._no_arguments_of(serializer, threshold)

    def _no_arguments_of(self, serializer: str, threshold: int) -> SplitValue:
        """The arguments of a call without any, serialised once per serializer."""
        payload = self._no_arguments.get(serializer)
        if payload is None:  # (read only by its users: shared by every call without any)
            payload = split(([], {}), serializer, "arguments", threshold)
            self._no_arguments[serializer] = payload
        return payload

    def _holder_queue(
        self, task: Task, refs: Sequence[ValueRef], requires: Sequence[str]
    ) -> str | None:
        """The own queue of the live process holding the largest of ``refs``, if any.

        ``None`` too when that process is busy and moving the value beats waiting: the
        task then goes to the default queue.
        """
        if not self.through_apps or task.app is None or not any(ref.holder for ref in refs):
            return None
        moving = None
        if self.store is not None:
            settings = self.settings
            moving = functools.partial(
                Moving.through,
                self.store,
                settings.default_queue,
                settings.move_bytes,
                task.app.sent_to,
            )
        return holder_queue_for(refs, task.app.workers, requires, moving)


def as_task(task: Signable) -> Task:
    """``task`` as a :class:`~nbtask.Task`; anything else is refused with a clear error."""
    if not isinstance(task, Task):
        raise ConfigurationError(f"{task!r} is not a task: make one with @app.task")
    return task


def to_publish(message: TaskMessage, raw: bytes) -> Publish:
    """What the transport needs to enqueue ``message``, with its PENDING record."""
    record = pending_fields(
        message.name, message.client, message.queue, message.run[1], message.label or ""
    )
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
