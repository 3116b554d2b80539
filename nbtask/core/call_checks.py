"""What one call of a task passes, checked before it is sent: arguments, times, callbacks.

The checks :class:`~nbtask.core.task.Task` makes of a call (``apply_async``,
``delay_many``, ``retry``): the shape of its positional and keyword arguments, the
signature of ``run`` they must fit (read once per task class), ``eta`` and ``expires`` as
epoch seconds, ``link`` and ``link_error`` as callbacks. Kept apart from the Task class,
which reads as the API a task's author and caller use; a wrong call fails here, in the
caller, and nothing is sent.
"""

from __future__ import annotations

import datetime as dt
import inspect
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from nbtask._text import value_text
from nbtask.core.canvas import Callbacks, Signature
from nbtask.core.options import NO_PRIORITY, is_seconds, new_task_id, time_at
from nbtask.errors import ConfigurationError

#: The option of a follow-up whose task id was drawn for it (see :func:`link_callbacks`).
AUTO_ID = "auto_id"

__all__ = [
    "AUTO_ID",
    "CELERY_SEND_OPTIONS",
    "call_arguments",
    "epoch",
    "link_callbacks",
    "positional_args",
    "refuse_celery_options",
    "run_signature",
]

_BY_QUEUE = "nbtask routes by queue name alone: pass queue=... (or the app's routes=)"
_ON_THE_TASK = "it is the task's own option here: set it with @app.task({name}=...)"
_CONNECTED = "each App keeps its own connections to the broker: leave it out"
_FAMILY = (
    "a task sent from inside a running task gets that task's ids by itself (its "
    "self.request.parent_id and root_id): leave it out"
)
_RETRIED = (
    "nbtask sends again what a dropped connection lost, and raises BrokerUnavailable "
    "when the broker cannot be reached: leave it out"
)
# Options of Celery's apply_async that nbtask has no per-call counterpart for, and what to
# do instead: Celery accepts them, so a migrating caller passes them by habit.
CELERY_SEND_OPTIONS = {
    "priority": "",
    "serializer": _ON_THE_TASK,
    "ignore_result": _ON_THE_TASK,
    "acks_late": _ON_THE_TASK,
    "routing_key": _BY_QUEUE,
    "exchange": _BY_QUEUE,
    "exchange_type": _BY_QUEUE,
    "retry": _RETRIED,
    "retry_policy": _RETRIED,
    "compression": "nbtask does not compress messages; large values travel as blobs",
    "headers": "nbtask messages carry no custom headers: pass the values as arguments",
    "shadow": "a task is shown by its name: give it another with @app.task(name=...)",
    "connection": _CONNECTED,
    "producer": _CONNECTED,
    "publisher": _CONNECTED,
    "reply_to": "outcomes come back to the app that sent the task, by themselves: leave it out",
    "delivery_mode": "task messages are always kept (persistent on RabbitMQ): leave it out",
    "add_to_parent": (
        "a task keeps no list of those it sent (no h.children): keep the handles, or chain "
        "the tasks; leave it out"
    ),
    "parent_id": _FAMILY,
    "root_id": _FAMILY,
    "group_id": "a group's id is group([...]).apply_async(task_id=...): send them as a group",
    "chord": (
        "nbtask has no chords: send the group, then the task with its results, "
        "task.delay(group([...]).delay().get())"
    ),
}


def refuse_celery_options(options: Mapping[str, Any], call: str = "apply_async") -> None:
    """Refuse keywords ``call`` does not take: Celery's send options with what to do instead.

    ``call`` is ``apply_async``, or ``retry``, to which Celery passes them on.
    """
    for name in options:
        advice = CELERY_SEND_OPTIONS.get(name)
        if advice is None:
            raise TypeError(f"{call}() got an unexpected keyword argument {name!r}")
        if name == "priority":
            raise ConfigurationError(NO_PRIORITY)
        raise ConfigurationError(
            f"{call}({name}=...) is Celery's, not nbtask's: {advice.format(name=name)}; "
            "nothing was sent"
        )


def link_callbacks(
    link: Signature | Sequence[Signature] | None, link_error: Signature | Sequence[Signature] | None
) -> Callbacks:
    """The ``callbacks`` option of ``link`` and ``link_error``, as workers get them.

    Each is a signature, or a list or tuple of them.
    """

    def as_tuple(value: object, name: str) -> tuple[Signature, ...]:
        # A list or tuple of them, else one (refused below if it is not a signature).
        items: tuple[object, ...] = (
            () if value is None else tuple(value) if isinstance(value, (list, tuple)) else (value,)
        )
        signatures: list[Signature] = []
        for item in items:
            if not isinstance(item, Signature):
                raise ConfigurationError(f"{name} takes signatures (task.s(...)), got {item!r}")
            signatures.append(item)
        return tuple(signatures)

    return Callbacks(
        tuple(_with_own_id(sig) for sig in as_tuple(link, "link")),
        tuple(_with_own_id(sig) for sig in as_tuple(link_error, "link_error")),
    )


def _with_own_id(sig: Signature) -> Signature:
    """``sig`` for a worker to send, with a task id of its own fixed now, in the message.

    A follow-up sent again (a replay of its task's message, that task's follow-ups
    marked owed again) then has a task that ran already: it is never queued twice.
    ``AUTO_ID`` marks an id nobody asked for: no handle waits on it.
    """
    if sig.prepared or sig.options.get("task_id"):
        return sig.for_worker()
    return sig.for_worker(task_id=new_task_id(), **{AUTO_ID: True})


def epoch(when: dt.datetime | float | None, *, absolute: bool) -> float | None:
    """Turn a datetime or seconds into epoch seconds (relative seconds unless absolute).

    ``absolute`` is the ``eta`` option's meaning; else it is ``expires``'s (named in errors).
    A time past year 9999 (or as far before 1970) is refused: a worker would refuse it.
    """
    if when is None:
        return None
    if isinstance(when, dt.datetime):
        if when.tzinfo is None:
            option = _when_option(absolute)
            raise ConfigurationError(
                f"{option}={when!r} has no timezone, so which moment it means is unclear: give "
                f"an aware datetime ({option}=datetime.now(timezone.utc) + timedelta(seconds=30))"
                f", or seconds ({'countdown' if absolute else 'expires'}=30)"
            )
        return time_at(_when_option(absolute), when.timestamp(), 0.0, when)
    if is_seconds(when):
        return time_at(_when_option(absolute), when, 0.0 if absolute else time.time())
    raise ConfigurationError(
        f"{_when_option(absolute)}={value_text(when)} is not a datetime or a number of seconds"
    )


def _when_option(absolute: bool) -> str:
    return "eta" if absolute else "expires"


def call_arguments(
    args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None, where: str = "apply_async"
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A call's positional and keyword arguments, refused (naming ``where``) if of another shape.

    A string is refused too: ``apply_async("ab")`` would call the task with ``"a", "b"``.
    """
    positional = () if args is None else positional_args(args, f"{where}(args=...)")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ConfigurationError(
            f"{where}(kwargs=...) takes a dict of keyword arguments, got "
            f"{type(kwargs).__name__} {kwargs!r}"
        )
    return positional, dict(kwargs or {})


def positional_args(args: object, where: str) -> tuple[Any, ...]:
    """``args`` as one call's positional arguments, or one error saying what ``where`` takes."""
    if type(args) is tuple:  # delay()'s: no ABC check
        return args
    if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
        raise ConfigurationError(
            f"{where} takes a tuple or list of positional arguments, got "
            f"{type(args).__name__} {args!r}; to pass one value, give ({args!r},)"
        )
    return tuple(args)


_SIGNATURES: weakref.WeakKeyDictionary[type[Any], inspect.Signature | None] = (
    weakref.WeakKeyDictionary()
)
_UNREAD = inspect.Signature()  # a class whose signature was not read yet


#: Per class, the shapes of calls (positional count, keyword names) its ``run`` accepts:
#: whether a call fits a signature depends on its shape alone, not on the values.
_FITTING: weakref.WeakKeyDictionary[type[Any], set[tuple[Any, ...]]] = weakref.WeakKeyDictionary()
_FITTING_MAX = 64


def check_fits(
    cls: type[Any], signature: inspect.Signature, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> None:
    """Raise ``TypeError`` unless ``signature`` (``cls``'s ``run``) accepts the call.

    A shape of call accepted once is not bound again.
    """
    shape = (len(args), *kwargs)
    fitting = _FITTING.get(cls)
    if fitting is not None and shape in fitting:
        return
    params = signature.parameters.values()
    if all(p.kind is not p.VAR_KEYWORD for p in params):
        # Named first, as Python names it: bind() would report the parameter that a
        # misspelt keyword left missing ('y' for z=2), not the misspelling.
        takes = {p.name for p in params if p.kind not in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL)}
        unknown = [name for name in kwargs if name not in takes]
        if unknown:
            raise TypeError(f"got an unexpected keyword argument {unknown[0]!r}")
    signature.bind(*args, **kwargs)
    if fitting is None:
        fitting = _FITTING[cls] = set()
    if len(fitting) < _FITTING_MAX:
        fitting.add(shape)


def run_signature(cls: type[Any]) -> inspect.Signature | None:
    """The signature a call of ``cls``'s ``run`` must fit (without ``self``), if readable.

    Read once per class, kept while the class lives.
    """
    signature = _SIGNATURES.get(cls, _UNREAD)
    if signature is _UNREAD:
        signature = _SIGNATURES[cls] = _read_signature(cls)
    return signature


def _read_signature(cls: type[Any]) -> inspect.Signature | None:
    run = inspect.getattr_static(cls, "run")
    # Only plain functions are read: what another callable makes of ``self`` is its own.
    function = run.__func__ if isinstance(run, staticmethod) else run
    if not inspect.isfunction(function):
        return None
    signature = inspect.signature(function)
    if function is run:  # a method: the call does not give ``self``
        signature = signature.replace(parameters=list(signature.parameters.values())[1:])
    return signature
