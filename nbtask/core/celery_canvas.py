"""Celery's names on signatures and group results, with Celery's meanings.

Code written for Celery builds signatures with ``clone()``, ``link()``, ``on_error()``
and ``freeze()``, and reads a ``GroupResult``'s ``id``, ``results``, ``join()`` and
``waiting()``: each is mixed into :class:`~nbtask.Signature` and
:class:`~nbtask.GroupHandle` here. A group's ``save()`` and ``forget()`` (and the app's
``GroupResult``) raise one error saying what to do instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn, Protocol, TypeVar

from nbtask.core.celery_result import NO_FORGET, not_in_nbtask
from nbtask.core.handle import TaskHandle
from nbtask.core.options import new_task_id

__all__ = ["NO_GROUP_RECORD", "CeleryGroupNames", "CelerySignatureNames"]

#: Why a group handle cannot be saved, nor restored by its id (Celery's
#: ``GroupResult.save()``, ``app.GroupResult``, ``GroupResult.restore(id)``).
NO_GROUP_RECORD = (
    "nbtask keeps no record of a group, only of each task: keep the tasks' ids, "
    "ids = [h.id for h in gh], and gather them again, in any process, with "
    "nbtask.GroupHandle([app.handle(i) for i in ids], group_id)"
)

_S = TypeVar("_S")


class _Signed(Protocol):
    """What the signature names use of a signature."""

    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    options: Mapping[str, Any]
    immutable: bool

    @property
    def task(self) -> Any:
        """The task."""

    def extended(self, key: str, more: object) -> Any:
        """A copy with ``more`` added to its ``link`` or ``link_error`` list."""


class CelerySignatureNames:
    """Celery's ``Signature`` names, mixed into :class:`~nbtask.Signature`.

    As Celery's, ``set``, :meth:`link`, :meth:`link_error`, :meth:`on_error` and
    :meth:`freeze` change the signature itself (``sig.link(cb); sig.delay()`` sends the
    link); :meth:`clone` returns a new signature.
    """

    @property
    def name(self: _Signed) -> str:
        """The task's registered name (Celery's ``sig.name``)."""
        return str(self.task.name)

    def clone(
        self: _S,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> _S:
        """A copy, with extra arguments and options, as Celery's ``clone``.

        Parameters
        ----------
        args
            Put before the signature's own (an immutable one keeps its own only).
        kwargs, **options
            Merged over the signature's own.
        """
        signed: Any = self
        new_args = signed.args if signed.immutable else (*(args or ()), *signed.args)
        copy: _S = dataclasses.replace(
            signed,
            args=tuple(new_args),
            kwargs={**signed.kwargs, **(kwargs or {})},
            options={**signed.options, **options},
        )
        return copy

    def link(self, callback: Any) -> Any:
        """Send ``callback`` with the result when the task succeeds; returns ``callback``.

        Adds to the signature's ``link`` option in place, as Celery's.
        """
        _add_in_place(self, "link", callback)
        return callback

    def link_error(self, errback: Any) -> Any:
        """Send ``errback`` with the task's id when it fails; returns ``errback``.

        Adds to the signature's ``link_error`` option in place, as Celery's.
        """
        _add_in_place(self, "link_error", errback)
        return errback

    def on_error(self: _S, errback: Any) -> _S:
        """:meth:`link_error` that returns the signature: ``t.s(x).on_error(e.s()).delay()``."""
        _add_in_place(self, "link_error", errback)
        return self

    def freeze(self, _id: str | None = None) -> TaskHandle:
        """Give the signature its task id now and return the handle its send will have.

        As Celery's: the id is kept in the signature's options (its own ``task_id`` if it
        has one, else ``_id``, else a new one), so sending it later uses that id. The
        handle returned follows the task once it is sent: by this process
        (``sig.delay()`` then returns that same handle), or by a worker, as a ``link`` or
        ``link_error`` (``errback.freeze()`` before ``on_error(errback)``).

        Parameters
        ----------
        _id
            The id to give it, if it has none yet.
        """
        signed: Any = self
        task_id = signed.options.get("task_id") or _id or new_task_id()
        object.__setattr__(self, "options", {**signed.options, "task_id": task_id})
        handle: TaskHandle = signed.task.sender().expect(task_id, signed.task.name)
        return handle


def _add_in_place(signature: object, key: str, more: object) -> None:
    """Add ``more`` to a signature's ``link`` or ``link_error`` option, in place."""
    changed: Any = signature
    object.__setattr__(signature, "options", changed.extended(key, more).options)


class _Gathered(Protocol):
    """What the group names use of a group handle."""

    handles: list[TaskHandle]

    def get(self, timeout: float | None = None, *, propagate: bool = True) -> list[Any]:
        """Every result, in order."""


class CeleryGroupNames:
    """Celery's ``GroupResult`` names, mixed into :class:`~nbtask.GroupHandle`."""

    @property
    def results(self: _Gathered) -> list[TaskHandle]:
        """The tasks' handles, in the group's order (Celery's ``GroupResult.results``)."""
        return list(self.handles)

    @property
    def children(self: _Gathered) -> list[TaskHandle]:
        """Celery's other name for :attr:`results`."""
        return list(self.handles)

    def join(
        self: _Gathered,
        timeout: float | None = None,
        propagate: bool = True,
        interval: float = 0.5,
        **unused: Any,
    ) -> list[Any]:
        """Celery's ``join``: :meth:`get`, every result in order.

        Parameters
        ----------
        timeout
            Seconds to wait for all of them at most; ``None`` waits until all end.
        propagate
            ``False``: a failed task's exception takes its place in the list.
        interval, **unused
            Celery's polling options (``interval``, ``callback``, ``no_ack``...): taken
            and unused, since outcomes arrive as messages.
        """
        return self.get(timeout, propagate=propagate)

    def join_native(
        self: _Gathered,
        timeout: float | None = None,
        propagate: bool = True,
        interval: float = 0.5,
        **unused: Any,
    ) -> list[Any]:
        """Celery's ``join_native``: the same as :meth:`join`."""
        return self.get(timeout, propagate=propagate)

    def waiting(self: _Gathered) -> bool:
        """True while any task has not finished (Celery's ``GroupResult.waiting``)."""
        return not all(h.ready() for h in self.handles)

    def revoke(self: _Gathered, terminate: bool = False, *, grace: float = 5.0) -> bool:
        """Revoke every task (Celery's ``GroupResult.revoke``).

        Returns
        -------
        bool
            Whether any was revoked before it started or sent a terminate request.
        """
        revoked = [h.revoke(terminate, grace=grace) for h in self.handles]
        return any(revoked)

    @property
    def save(self) -> NoReturn:
        """Not in nbtask: Celery's ``GroupResult.save()``; no group record is kept."""
        raise not_in_nbtask("GroupHandle.save()", NO_GROUP_RECORD)

    @property
    def forget(self) -> NoReturn:
        """Not in nbtask: the tasks' records are dropped ``result_ttl`` after they end."""
        raise not_in_nbtask("GroupHandle.forget()", NO_FORGET)
