"""What follows a task's code wherever it runs: on a worker, or here with ``Task.apply``.

Celery's handlers in Celery's order (:func:`call_handlers`), which exceptions retry a task
by themselves (:func:`autoretries`), and how a failure is logged (:func:`log_failure`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import traceback
import types
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, NoReturn, Protocol

from nbtask.core.context import Request, own_request
from nbtask.errors import Retry, TaskPredicate
from nbtask.wire.events import State

__all__ = [
    "ExceptionInfo",
    "HandledTask",
    "autoretries",
    "autoretry_kwargs",
    "call_handler",
    "call_handlers",
    "exception_info",
    "log_failure",
    "user_traceback",
]

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


#: What ``sys.exc_info()`` returns for an exception.
_ExcInfo = tuple[type[BaseException], BaseException, types.TracebackType | None]


@dataclasses.dataclass(frozen=True)
class ExceptionInfo:
    """What failure handlers get as ``einfo``: the exception and its traceback text.

    As Celery's (billiard's) ``ExceptionInfo``, ``str(einfo)`` is the traceback text, and
    ``type``, ``tb`` and ``exc_info`` are there too.

    Parameters
    ----------
    exception
        The exception the task raised.
    traceback
        Its formatted traceback, from the task's code on.
    """

    exception: BaseException
    traceback: str

    @property
    def type(self) -> type[BaseException]:
        """The exception's class."""
        return type(self.exception)

    @property
    def tb(self) -> types.TracebackType | None:
        """The exception's traceback object, if it has one (Celery's ``einfo.tb``).

        ``None`` for an error nbtask made for the task, never raised in it (its process
        killed past its hard time limit): :attr:`traceback` says what happened.
        """
        return self.exception.__traceback__

    @property
    def exc_info(self) -> _ExcInfo:
        """``(type, exception, tb)``, as ``sys.exc_info()`` (Celery's ``einfo.exc_info``)."""
        return self.type, self.exception, self.tb

    def __str__(self) -> str:
        """The traceback text, as Celery's ``str(einfo)``."""
        return self.traceback


class HandledTask(Protocol):
    """What running a task uses of it (a :class:`~nbtask.Task`)."""

    @property
    def name(self) -> str:
        """The task's registered name."""

    @property
    def autoretry_for(self) -> tuple[type[BaseException], ...]:
        """Exceptions that retry the task by themselves."""

    @property
    def dont_autoretry_for(self) -> tuple[type[BaseException], ...]:
        """Exceptions never retried by themselves."""

    @property
    def retry_kwargs(self) -> Mapping[str, Any]:
        """What an automatic retry passes to :meth:`retry`."""

    @property
    def retry_backoff(self) -> bool | float:
        """Whether (and by what factor) retries back off."""

    @property
    def throws(self) -> tuple[type[BaseException], ...]:
        """Expected exceptions: logged in one line."""

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """The task's body."""

    def call_from_run(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        """Run the task's code for a run: through its class's own ``__call__``, if any."""

    def retry(
        self,
        exc: BaseException | None = None,
        countdown: float | None = None,
        eta: Any = None,
        max_retries: int | None = None,
    ) -> NoReturn:
        """Raise ``Retry``, or the cause once retries are exhausted."""

    # Celery's handlers: what they are given and when they are called is said once, on
    # the task (nbtask.core.task_running.RunningTask); running a task only calls them.
    @property
    def before_start(self) -> Callable[..., object]:
        """:meth:`~nbtask.Task.before_start`."""

    @property
    def on_success(self) -> Callable[..., object]:
        """:meth:`~nbtask.Task.on_success`."""

    @property
    def on_failure(self) -> Callable[..., object]:
        """:meth:`~nbtask.Task.on_failure`."""

    @property
    def on_retry(self) -> Callable[..., object]:
        """:meth:`~nbtask.Task.on_retry`."""

    @property
    def after_return(self) -> Callable[..., object]:
        """:meth:`~nbtask.Task.after_return`."""


def autoretries(task: HandledTask, exc: BaseException) -> bool:
    """Whether ``exc`` retries ``task`` by itself: ``autoretry_for`` less ``dont_autoretry_for``.

    A ``Retry`` (``raise self.retry()``) is a retry already; ``Reject`` and ``Ignore``
    say how the run ends, and are never retried (Celery's), whatever ``autoretry_for`` says.
    """
    if isinstance(exc, (Retry, TaskPredicate)) or not task.autoretry_for:
        return False
    return isinstance(exc, task.autoretry_for) and not isinstance(exc, task.dont_autoretry_for)


def autoretry_kwargs(task: HandledTask) -> dict[str, Any]:
    """What an automatic retry passes to ``task.retry()``: its ``retry_kwargs``.

    With ``retry_backoff`` the backoff decides the delay, as in Celery (whose autoretry
    sets ``countdown`` to the backoff's).
    """
    kwargs = dict(task.retry_kwargs)
    if task.retry_backoff:
        kwargs.pop("countdown", None)
        kwargs.pop("eta", None)
    return kwargs


def exception_info(exc: BaseException) -> ExceptionInfo:
    """The ``einfo`` handlers get: the exception and its whole traceback as text."""
    return ExceptionInfo(
        exc, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    )


def user_traceback(exc: BaseException) -> str:
    """The traceback text of ``exc`` from the user's code on: nbtask's own frames skipped.

    Empty when no frame is the user's (e.g. ``NotRegistered``: its message says it all).
    """
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb)) if tb is not None else ""


def log_failure(
    log: logging.Logger, task: HandledTask | None, said: str, exc: BaseException, tb: str
) -> None:
    """Log that a task failed (``said``): in one line at INFO if ``task`` expects ``exc``.

    An exception in the task's ``throws`` is expected; any other is logged at ERROR with
    the traceback ``tb``.
    """
    if task is not None and task.throws and isinstance(exc, task.throws):
        log.info("%s (expected: in its throws)", said)
    else:
        log.error("%s\n%s", said, tb.rstrip() or "(no traceback)")


def call_handler(log: logging.Logger, handler: Any, *args: Any) -> None:
    """Call a handler; a failing one must not lose the task's outcome: log it."""
    try:
        handler(*args)
    except Exception:
        log.exception("handler %s raised; the task's outcome is unaffected", handler.__name__)


def call_handlers(
    log: logging.Logger,
    task: HandledTask,
    state: State,
    task_id: str,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    *,
    retval: Any = None,
    exc: BaseException | None = None,
    einfo: ExceptionInfo | None = None,
    request: Request | None = None,
) -> None:
    """Celery's handlers of a run that ended in ``state``, in Celery's order.

    ``on_success``, ``on_retry`` or ``on_failure``, then ``after_return`` (not for a
    retry: the task has not returned yet). The run's ``request`` is the task's
    ``self.request`` in them, as in Celery (its events are sent: it reports no more).
    """
    own: AbstractContextManager[None] = contextlib.nullcontext()
    if request is not None:
        own = own_request(task, dataclasses.replace(request, emit=None))
    with own:
        if state is State.SUCCESS:
            call_handler(log, task.on_success, retval, task_id, args, kwargs)
        elif state is State.RETRY and exc is not None and einfo is not None:
            call_handler(log, task.on_retry, exc, task_id, args, kwargs, einfo)
        elif exc is not None and einfo is not None:
            call_handler(log, task.on_failure, exc, task_id, args, kwargs, einfo)
        if state is State.RETRY:
            return
        returned = retval if state is State.SUCCESS else exc
        call_handler(log, task.after_return, state.value, returned, task_id, args, kwargs, einfo)
