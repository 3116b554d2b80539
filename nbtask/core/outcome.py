"""What a task's final event makes of its handle: a result, or the exception it raises.

A large result comes as a :class:`~nbtask.wire.events.Deferred`: the handle reads it from
the store the first time it is asked for (:func:`load_result`), on the asking thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple

from nbtask.core.task_errors import not_kept, revoked, task_exception, unloadable, worker_lost
from nbtask.errors import NbtaskError
from nbtask.wire.blobs import ByteProgress
from nbtask.wire.events import Deferred, Event, EventType, Unloadable, lacks_code

__all__ = ["FetchWatch", "Outcome", "final_outcome", "load_result"]

#: Shows a fetch of ``(label, total bytes)`` while it runs: a context manager around the
#: fetch, yielding the callback told how many bytes arrived (a notebook's progress bar).
FetchWatch = Callable[[str, int], contextlib.AbstractContextManager[ByteProgress]]


class Outcome(NamedTuple):
    """How a task ended, as its handle settles it."""

    #: The result (a :class:`~nbtask.wire.events.Deferred` for a large one), if no error.
    value: Any
    #: The exception the handle raises, if the task did not succeed.
    error: BaseException | None
    #: ``(what the task did before it failed or was stopped,)``, or None when its final
    #: event does not say (the handle's ``partial`` stays as it is).
    partial: tuple[Any] | None


def final_outcome(event: Event, result: Any, task_id: str, label: str) -> Outcome:
    """The outcome of a task from its final ``event`` and the ``result`` that came with it.

    Parameters
    ----------
    event
        The task's final event: ``SUCCESS``, ``FAILURE``, ``REVOKED`` or ``WORKER_LOST``.
    result
        Its value: the task's result, or for a failure or revoke the body reporting it.
    task_id, label
        The task's id, and how errors name it (``name[id]``).
    """
    data = event.data
    if event.type is EventType.SUCCESS and isinstance(result, Unloadable):
        return Outcome(None, unloadable(label, result.why, missing=result.missing), None)
    if event.type is EventType.SUCCESS and data.get("result_kept") is False:
        return Outcome(None, not_kept(label), None)  # the stored note, read by id
    if event.type is EventType.SUCCESS:
        return Outcome(result, None, None)
    if event.type is EventType.REVOKED:
        partial = result.get("partial") if isinstance(result, dict) else None
        return Outcome(None, revoked(label, data), (partial,))
    if event.type is EventType.WORKER_LOST:
        return Outcome(None, worker_lost(label, task_id, data), None)
    body = result if isinstance(result, dict) else {}
    error = task_exception(task_id, data, body.get("exception"))
    return Outcome(None, error, (body.get("partial"),))


def load_result(deferred: Deferred, name: str, task_id: str, watch: FetchWatch | None) -> Any:
    """Read task ``name[task_id]``'s large result from the store, shown by ``watch`` if given.

    Raises
    ------
    BlobError
        The result's blobs expired or were altered in the store.
    SerializationError
        The result needs a class this process cannot import, or does not rebuild here.
    """
    try:
        if watch is None:
            return deferred.load()
        with watch(f"the result of {name}[{task_id[:8]}]", deferred.size) as progress:
            return deferred.load(progress)
    except NbtaskError:
        raise
    except Exception as exc:
        why = f"{type(exc).__name__}: {exc}"
        raise unloadable(f"{name}[{task_id}]", why, missing=lacks_code(exc)) from None
