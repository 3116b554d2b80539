"""Celery's ``AsyncResult`` names on a :class:`~nbtask.TaskHandle`, with Celery's meanings.

Code written for Celery reads ``status``, ``task_id`` and ``traceback`` and calls
``revoke()`` and ``wait()``, and ``date_done``: each is an alias of what the handle already
does. As Celery's ``AsyncResult``, a handle equals its id string (``h == h.id``) and any
handle of the same task, and hashes as its id. The names nbtask has no counterpart for
(``forget``, ``children``, ``collect``, ``then``, ``args``, ``kwargs``) raise one error
saying what to do instead, rather than a bare ``AttributeError``. ``str(h)`` is the id, as
Celery's.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, NoReturn, Protocol

from nbtask.errors import RemoteError
from nbtask.wire.events import State

__all__ = ["NO_FORGET", "CeleryResultNames", "not_in_nbtask"]

#: Why ``forget()`` (a task handle's, a group handle's) is not needed.
NO_FORGET = (
    "a task's record and result are dropped by the store result_ttl seconds after it "
    "ends (App(result_ttl=...) or NBTASK_RESULT_TTL); a task with "
    "@app.task(ignore_result=True) keeps no result at all"
)


class _Handle(Protocol):
    """What the aliases use of a handle."""

    id: str

    @property
    def state(self) -> State | str:
        """The latest known state."""

    def done(self) -> bool:
        """True once the task ended."""

    @property
    def error(self) -> BaseException | None:
        """The task's exception, once it ended; never raises."""

    @property
    def finished_at(self) -> float | None:
        """When the task ended (epoch seconds), once it has."""

    def get(
        self,
        timeout: float | None = None,
        *,
        propagate: bool = True,
        disable_sync_subtasks: bool = True,
    ) -> Any:
        """Wait for the result."""

    def send_revoke(self, *, terminate: bool, grace: float, signal: str | int = "SIGTERM") -> bool:
        """Revoke the task through its app."""


def not_in_nbtask(spelling: str, instead: str) -> AttributeError:
    """The error of a Celery name nbtask has no counterpart for, saying what to do instead.

    Parameters
    ----------
    spelling
        The name as a Celery user writes it (``"TaskHandle.forget()"``).
    instead
        What nbtask offers in its place.
    """
    return AttributeError(f"{spelling} is Celery's; nbtask has no counterpart: {instead}")


def _not_in_nbtask(name: str, instead: str) -> AttributeError:
    return not_in_nbtask(f"TaskHandle.{name}", instead)


class CeleryResultNames:
    """Celery's ``AsyncResult`` names, mixed into :class:`~nbtask.TaskHandle`."""

    id: str

    def __eq__(self, other: object) -> bool:
        """Celery's: equal to a handle of the same task, or to the task's id string."""
        if isinstance(other, CeleryResultNames):
            return other.id == self.id
        if isinstance(other, str):
            return other == self.id
        return NotImplemented

    def __hash__(self) -> int:
        """Celery's ``hash(h) == hash(h.id)``: a handle and its id find the same entry."""
        return hash(self.id)

    def __str__(self) -> str:
        """Celery's ``str(AsyncResult)``: the task id (``json.dumps({"id": str(h)})``).

        ``repr(h)`` still names the task and its state.
        """
        return self.id

    @property
    def status(self: _Handle) -> str:
        """Celery's name for :attr:`state`, as a plain string (``"SUCCESS"``)."""
        state = self.state
        return state.value if isinstance(state, State) else state

    @property
    def task_id(self: _Handle) -> str:
        """Celery's name for :attr:`id`."""
        return self.id

    @property
    def traceback(self: _Handle) -> str | None:
        """The worker's traceback text of a task that failed; ``None`` otherwise.

        ``None`` too while the task runs, and for a task that succeeded, was revoked or
        whose worker was lost (no traceback of its code exists).
        """
        error = self.error
        remote = error if isinstance(error, RemoteError) else getattr(error, "__cause__", None)
        if isinstance(remote, RemoteError) and remote.traceback:
            return remote.traceback
        return None

    @property
    def date_done(self: _Handle) -> dt.datetime | None:
        """When the task ended, an aware UTC ``datetime``; ``None`` until it has.

        Celery's name for :attr:`finished_at` (the clock of the worker that ended it).
        """
        done = self.finished_at
        return None if done is None else dt.datetime.fromtimestamp(done, dt.timezone.utc)

    def revoke(
        self: _Handle,
        terminate: bool = False,
        *,
        grace: float = 5.0,
        signal: str | int = "SIGTERM",
    ) -> bool:
        """Celery's ``AsyncResult.revoke``: :meth:`nbtask.App.revoke` of this task.

        A queued task never starts; a running one runs on unless ``terminate`` (then it
        gets ``KeyboardInterrupt``, and is killed ``grace`` seconds later if it has not
        ended; ``signal=`` as for :meth:`nbtask.App.revoke`). :meth:`cancel` is
        ``revoke(terminate=True)``.

        Returns
        -------
        bool
            True if the task was revoked before it started, or a terminate request was
            sent; False if it had already finished (or is running, without ``terminate``).
        """
        return self.send_revoke(terminate=terminate, grace=grace, signal=signal)

    def wait(
        self: _Handle,
        timeout: float | None = None,
        propagate: bool = True,
        *,
        disable_sync_subtasks: bool = True,
    ) -> Any:
        """Celery's older name for :meth:`get`: the same wait, result and errors."""
        return self.get(timeout, propagate=propagate, disable_sync_subtasks=disable_sync_subtasks)

    @property
    def forget(self) -> NoReturn:
        """Not in nbtask: a task's record and result are dropped ``result_ttl`` after it ends."""
        raise _not_in_nbtask("forget()", NO_FORGET)

    @property
    def children(self) -> NoReturn:
        """Not in nbtask: tasks sent from a task are not listed on its handle."""
        raise _not_in_nbtask(
            "children",
            "the tasks a task sends are not listed on its handle; return their ids from the "
            "task and follow each with app.handle(id), or chain the tasks, and the last "
            "step's handle walks back through .parent",
        )

    @property
    def collect(self) -> NoReturn:
        """Not in nbtask: a handle does not walk a graph of results."""
        raise _not_in_nbtask(
            "collect()",
            "a chain's last handle walks back through .parent (h.parent.get()), and a "
            "group's handle gets every result at once (group([...]).delay().get())",
        )

    @property
    def then(self) -> NoReturn:
        """Not in nbtask: Celery's promise callback; a handle is a ``Future``."""
        raise _not_in_nbtask(
            "then()",
            "a handle is a concurrent.futures.Future: h.add_done_callback(fn) calls fn(h) "
            "once the task ended, and apply_async(..., on_event=fn) or h.on_event(fn) gets its "
            "progress and states as they come",
        )

    @property
    def args(self) -> NoReturn:
        """Not in nbtask: a handle does not keep the arguments it was sent with."""
        raise _not_in_nbtask("args", _NO_ARGUMENTS)

    @property
    def kwargs(self) -> NoReturn:
        """Not in nbtask: a handle does not keep the arguments it was sent with."""
        raise _not_in_nbtask("kwargs", _NO_ARGUMENTS)


#: Why ``h.args`` and ``h.kwargs`` (Celery's, with ``result_extended``) do not exist.
_NO_ARGUMENTS = (
    "a handle does not keep the arguments it was sent with (nor does the result store); "
    "keep them beside the handle when you send, e.g. calls[h.id] = (args, kwargs), or read "
    "self.request.args / self.request.kwargs inside a task with bind=True"
)
