"""Celery's ``current_task``: the task running in this thread, found when used.

A worker (and ``Task.apply``) marks the task it runs with :func:`task_running`;
:data:`current_task` is a proxy to it, as Celery's ``celery.current_task`` is: its
attributes are the running task's (``current_task.request.id``, ``current_task.name``),
and it is false outside a run.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

from nbtask.core.bound import Bound

__all__ = ["Proxy", "current_task", "running_task", "task_running"]

_task: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "nbtask_current_task", default=None
)


def task_running(task: object) -> Bound[object | None]:
    """Make ``task`` the :data:`current_task` of this thread for the ``with`` block."""
    return Bound(_task, task)


def running_task() -> object | None:
    """The task this thread runs (on a worker, or with ``Task.apply``); ``None`` outside."""
    return _task.get()


class Proxy:
    """Stands for what ``get()`` returns each time it is used (Celery's ``Proxy``).

    Attributes, calls, ``bool()``, ``==`` and ``repr()`` go to the object found then;
    ``_get_current_object()`` returns it.

    Parameters
    ----------
    get
        Finds the object (a module-level function: a pickled proxy names it).
    what
        The proxy's name, for the error when there is nothing to stand for.
    """

    __slots__ = ("_get", "_what")

    def __init__(self, get: Callable[[], Any], what: str) -> None:
        object.__setattr__(self, "_get", get)
        object.__setattr__(self, "_what", what)

    def _get_current_object(self) -> Any:
        """The object the proxy stands for now (Celery's name)."""
        return self._get()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # copy, pickle and friends look for these
            raise AttributeError(name)
        target = self._get()
        if target is None:
            raise AttributeError(
                f"{self._what}.{name}: no task is running in this thread, so "
                f"{self._what} is None (test it with `if {self._what}:` first)"
            )
        return getattr(target, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the object (``current_task(2, 2)`` runs the task's body, as Celery's)."""
        return self._get()(*args, **kwargs)

    def __bool__(self) -> bool:
        return bool(self._get())

    def __eq__(self, other: object) -> bool:
        target: object = self._get()
        return target == other

    def __hash__(self) -> int:
        return hash(self._get())

    def __repr__(self) -> str:
        return repr(self._get())

    def __reduce__(self) -> tuple[type[Proxy], tuple[Callable[[], Any], str]]:
        return type(self), (self._get, self._what)


#: The task running in this thread (Celery's ``celery.current_task``): on a worker, or in
#: ``Task.apply``; false, and ``None``-like, elsewhere. ``current_task.request`` is the
#: run's request, as ``self.request`` is for a bound task.
current_task: Any = Proxy(running_task, "current_task")
