"""What a task's own code calls while it runs, and the handlers called around it.

:class:`RunningTask` is mixed into :class:`~nbtask.Task`: the current ``request``,
``update_progress`` and ``update_state``, ``retry`` (and the delay before a retry), and
Celery's handlers (``before_start``, ``on_success``, ``on_failure``, ``on_retry``,
``after_return``), which do nothing until a task class overrides them.
"""

from __future__ import annotations

import datetime as dt
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn, Protocol

from nbtask.core.call_checks import epoch, refuse_celery_options
from nbtask.core.context import Request, directly_called, progress, request_of
from nbtask.core.handlers import ExceptionInfo, HandledTask
from nbtask.core.options import queue_name, seconds_from_now
from nbtask.errors import ConfigurationError, MaxRetriesExceededError, Retry
from nbtask.wire.events import FINAL_STATES

__all__ = ["RunningTask"]

#: The states ``update_state`` refuses: those a task reaches only by ending.
_ENDS = frozenset(state.value for state in FINAL_STATES)


class _Running(HandledTask, Protocol):
    """What running and retrying use of a task (a :class:`~nbtask.Task`)."""

    @property
    def max_retries(self) -> int | None:
        """How many retries the task may make (``None``: no limit)."""

    @property
    def default_retry_delay(self) -> float:
        """Seconds before a retry without backoff."""

    @property
    def retry_backoff_max(self) -> float:
        """The longest backoff delay, seconds."""

    @property
    def retry_jitter(self) -> bool:
        """Whether a backoff delay is drawn at random up to its value."""

    @property
    def request(self) -> Request:
        """The current execution's request."""

    def retry_delay(self, retries: int) -> float:
        """Seconds before retry number ``retries + 1``."""


class RunningTask:
    """The part of :class:`~nbtask.Task` its code calls while it runs, and its handlers."""

    @property
    def request(self: _Running) -> Request:
        """The current execution's request, also in the handlers after the run.

        Outside a run (the task called as a function, ``add(1, 2)``, or read from
        elsewhere) it is Celery's empty one: ``called_directly`` is True, the id empty,
        ``args`` and ``kwargs`` the call's.
        """
        request = request_of(self)
        return request if request is not None else directly_called(self.name)

    def update_progress(self, done: float, total: float | None = None, message: str = "") -> None:
        """Report progress from inside the running task (as :func:`nbtask.progress`).

        Parameters
        ----------
        done, total
            Units of work done so far, and in all if known.
        message
            A short note shown beside the progress bar.
        """
        progress(done, total, message)

    def update_state(self: _Running, state: str, meta: Mapping[str, Any] | None = None) -> None:
        """Report a custom state from inside the running task.

        The client sees it as ``handle.state`` and ``handle.info["meta"]`` until the
        task's next state.

        A task's end is not a state it sets: ``SUCCESS``, ``FAILURE``, ``REVOKED`` and
        ``WORKER_LOST`` are refused, since the handle would show an end that is neither
        ``ready()`` nor what ``get()`` gives. Return the value, or raise the exception.

        Parameters
        ----------
        state
            The state's name, e.g. ``"PROGRESS"``.
        meta
            JSON-safe details of it.

        Raises
        ------
        ConfigurationError
            ``state`` names a task's end.
        """
        request = self.request
        if request.called_directly:
            raise RuntimeError(f"{self.name}.update_state is only available while the task runs")
        if str(state) in _ENDS:
            raise ConfigurationError(
                f"update_state(state={str(state)!r}) is a task's end, which nbtask stores "
                "only as the task ends: return the value for SUCCESS, raise the exception "
                "for FAILURE (raise ValueError('custom'); with @app.task(throws=(ValueError,)) "
                "the worker logs it in one line), revoke it for REVOKED; update_state sets "
                "the states of a running task, such as 'PROGRESS'"
            )
        if request.emit is not None:
            request.emit("state", {"state": str(state), "meta": dict(meta or {})})

    def retry(
        self: _Running,
        exc: BaseException | None = None,
        countdown: float | None = None,
        eta: dt.datetime | float | None = None,
        max_retries: int | None = None,
        *,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        queue: str | None = None,
        **celery_only: Any,
    ) -> NoReturn:
        """Send this task again later; call as ``raise self.retry()``.

        Parameters
        ----------
        exc
            The cause; re-raised as the task's error once retries are exhausted.
        countdown
            Seconds until the retry (default: ``default_retry_delay``, or the backoff).
        eta
            When to retry, instead of ``countdown``.
        max_retries
            Override the task's ``max_retries`` for this decision.
        args, kwargs
            The arguments the retry runs with, as in Celery: each one given replaces the
            task's own (default: the same).
        queue
            The queue the retry is sent to, as in Celery (default: the one it ran from).
        celery_only
            Celery's other ``apply_async`` options, which its ``retry`` passes on: refused
            with what to do instead (as :meth:`~nbtask.Task.apply_async` refuses them).

        Raises
        ------
        Retry
            Always, unless retries are exhausted (or, called as a function, there is an
            ``exc``: it is raised, as in Celery).
        MaxRetriesExceededError
            Retries are exhausted and there is no ``exc`` to re-raise.
        """
        if exc is not None and not isinstance(exc, BaseException):
            raise ConfigurationError(
                f"retry(exc=...) takes the exception that caused the retry, got {exc!r}"
            )
        if args is not None and (isinstance(args, (str, bytes)) or not isinstance(args, Sequence)):
            raise ConfigurationError(f"retry(args=...) takes a list or tuple, got {args!r}")
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise ConfigurationError(f"retry(kwargs=...) takes a dict, got {kwargs!r}")
        refuse_celery_options(celery_only, "retry")
        if queue:  # "" or None: the queue it ran from
            queue_name(queue, "retry(queue=...)")
        countdown = seconds_from_now("countdown", countdown)
        request = self.request
        if request.called_directly:  # as Celery's: nothing to send again
            raise exc if exc is not None else Retry("Task can be retried", None)
        limit = self.max_retries if max_retries is None else max_retries
        if limit is not None and request.retries >= limit:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(
                f"task {self.name}[{request.id}] gave up after {request.retries} retries"
            )
        if eta is not None:
            when = max(0.0, (epoch(eta, absolute=True) or 0.0) - time.time())
        elif countdown is not None:
            when = float(countdown)
        else:
            when = self.retry_delay(request.retries)
        said = f"retry in {when:.3g} s" + (f": {exc!r}" if exc else "")
        new_args = None if args is None else tuple(args)
        new_kwargs = None if kwargs is None else dict(kwargs)
        raise Retry(said, exc, when, new_args, new_kwargs, queue or None)

    def retry_delay(self: _Running, retries: int) -> float:
        """Seconds before retry number ``retries + 1``: fixed, or exponential with jitter."""
        if not self.retry_backoff:
            return float(self.default_retry_delay)
        factor = 1.0 if self.retry_backoff is True else float(self.retry_backoff)
        delay = min(factor * (2**retries), float(self.retry_backoff_max))
        # Full jitter, as Celery: spreads retries of many failing tasks apart.
        return random.uniform(0, delay) if self.retry_jitter else delay

    # Handlers: called on the worker, after the outcome is stored; errors are logged. What
    # they are given and when they are called is said here only (HandledTask names them).
    def before_start(self, task_id: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        """Called before the task runs."""

    def on_success(
        self, retval: Any, task_id: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> None:
        """Called when the task returned ``retval``."""

    def on_failure(
        self,
        exc: BaseException,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        einfo: ExceptionInfo,
    ) -> None:
        """Called when the task raised ``exc``."""

    def on_retry(
        self,
        exc: BaseException,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        einfo: ExceptionInfo,
    ) -> None:
        """Called when the task is to be retried."""

    def after_return(
        self,
        status: str,
        retval: Any,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        einfo: ExceptionInfo | None,
    ) -> None:
        """Called after every run, whatever the outcome (``status`` is the state)."""
