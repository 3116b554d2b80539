"""What a failed task's errbacks (``link_error``) are sent with, as Celery calls them.

Celery calls an errback whose function takes them as ``errback(request, exc, traceback)``,
and any other the old way, ``errback(task_id)`` (see :func:`takes_request`). So does
nbtask, sending the errback as a task, signed like any: the failed run's request without
what only its process can use, the exception if it pickles (else a stand-in saying the
same), and its traceback text.
"""

from __future__ import annotations

import dataclasses
import inspect
import socket
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from nbtask.core.canvas import Signature
from nbtask.core.context import Request
from nbtask.core.outcome import final_outcome
from nbtask.wire.envelope import dumps
from nbtask.wire.events import Event
from nbtask.wire.exceptions import portable_exception
from nbtask.wire.message import TaskMessage

__all__ = ["errback_arguments", "errback_calls", "takes_request", "unrun_request"]


class Ended(Protocol):
    """How the failed run ended (a worker's ``Outcome``)."""

    @property
    def event(self) -> Event:
        """Its final event."""

    @property
    def exc(self) -> BaseException | None:
        """The exception it raised, if it ran."""


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def takes_request(sig: Signature) -> bool:
    """Whether the errback ``sig`` is called as ``(request, exc, traceback)``.

    When its function has three positional parameters for them and accepts them before
    the signature's own arguments (``error_handler(request, exc, traceback)``); any other
    (``on_error(task_id)``, ``note.s(path)`` of ``note(value, path, *rest)``) gets the
    task's id, the old way. Celery's rule (more than one positional parameter, or
    ``*args``) would call these two the new way, and fail them.
    """
    run = getattr(sig.task, "run", None)
    if run is None:  # no function to read here: the old way
        return False
    try:
        signature = inspect.signature(run)
    except (TypeError, ValueError):
        return False
    named = [p for p in signature.parameters.values() if p.kind in _POSITIONAL]
    if len(named) < 3:
        return False
    # The datasets the task requires count as given: its worker passes them.
    given = {**dict.fromkeys(getattr(sig.task, "requires", ()) or ()), **sig.kwargs}
    try:
        signature.bind(None, None, None, *sig.args, **given)
    except TypeError:
        return False
    return True


def errback_arguments(
    request: Request, exc: BaseException | None, event: Event, label: str
) -> tuple[Any, ...]:
    """``(request, exc, traceback)`` for an errback of the run ``request`` that ended in ``event``.

    The request without what only the failed task's process can use (its event sender,
    store, held values, signer). The exception itself when it pickles (rebuilt in the
    errback without running its ``__init__``, as the client gets it); else, or for a
    revoked or lost task, the exception its handle raises. The traceback is the text
    the event carries (from the task's code on).
    """
    travelling = dataclasses.replace(request, emit=None, blob_store=None, holding=None, signer=None)
    data: Mapping[str, Any] = event.data
    return travelling, _portable(exc, event, request.id, label), str(data.get("traceback", ""))


def _portable(exc: BaseException | None, event: Event, task_id: str, label: str) -> object:
    """``exc`` as it pickles, or the exception the task's handle raises for ``event``."""
    if isinstance(exc, Exception):
        tb = exc.__traceback__
        try:
            exc.__traceback__ = None  # frames do not travel; the traceback text does
            for candidate in (
                portable_exception(exc),
                portable_exception(exc, picklable_only=True),
            ):
                try:
                    dumps(candidate)
                except Exception:  # whatever its own __reduce__ raises
                    continue
                return candidate
        finally:
            exc.__traceback__ = tb
    return final_outcome(event, {}, task_id, label).error


def errback_calls(
    message: TaskMessage, request: Request, ended: Ended, errbacks: Sequence[Signature]
) -> list[tuple[Signature, tuple[Any, ...]]]:
    """Each errback with what it gets first.

    Celery's ``(request, exc, traceback)`` if its function takes them
    (:func:`takes_request`), else the task's id; nothing if it is immutable.
    """
    calls: list[tuple[Signature, tuple[Any, ...]]] = []
    full: tuple[Any, ...] | None = None
    for sig in errbacks:
        if sig.immutable:
            calls.append((sig, ()))
        elif not takes_request(sig):
            calls.append((sig, (message.id,)))
        else:
            if full is None:
                label = f"{message.name}[{message.id}]"
                # The datasets it required stay on this worker, as they never travel.
                requires = set(message.requires or ())
                kwargs = {k: v for k, v in request.kwargs.items() if k not in requires}
                travelling = dataclasses.replace(request, kwargs=kwargs)
                full = errback_arguments(travelling, ended.exc, ended.event, label)
            calls.append((sig, full))
    return calls


def unrun_request(
    message: TaskMessage, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> Request:
    """The request of a task that did not run (its arguments did not load, or it was refused)."""
    return Request(
        id=message.id,
        name=message.name,
        args=args,
        kwargs=kwargs,
        queue=message.queue,
        hostname=socket.gethostname(),
        retries=message.retries,
        eta=message.eta,
        expires=message.expires,
        parent_id=message.parent_id,
        root_id=message.root_id,
    )
