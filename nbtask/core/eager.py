"""Running a task here, in the caller's process: ``Task.apply`` and its :class:`EagerResult`.

As Celery's ``apply``: the task runs at once on the calling thread, as a worker would run
it (``self.request``, ``before_start``, retries, handlers), and nothing touches the broker.
A retry runs again in place, at once: its countdown is not waited for (nor is Celery's).
``Reject`` and ``Ignore`` end the run as a worker ends it (no handlers, no automatic
retry), in the states a worker's handle shows, nbtask having no ``REJECTED`` or ``IGNORED``
(see :class:`EagerResult`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import datetime as dt
import inspect
import logging
import socket
import time
from collections.abc import Coroutine, Mapping
from typing import Any

from nbtask.core.context import Request, current_request, running
from nbtask.core.current import task_running
from nbtask.core.handlers import (
    ExceptionInfo,
    HandledTask,
    autoretries,
    autoretry_kwargs,
    call_handler,
    call_handlers,
    exception_info,
    log_failure,
    user_traceback,
)
from nbtask.errors import Ignore, Retry, TaskPredicate
from nbtask.wire.events import FAILED_STATES, FINAL_STATES, State

__all__ = ["EagerResult", "run_here"]

log = logging.getLogger("nbtask.apply")


class EagerResult:
    """The outcome of a task run here with ``task.apply()``: Celery's ``EagerResult``.

    The task has ended when it is returned: nothing waits, nothing is read from a store.
    Unlike a :class:`~nbtask.TaskHandle` (a ``concurrent.futures.Future``, whose
    ``result()`` is a method), :attr:`result` is Celery's attribute: the return value,
    or the exception the task raised.

    Where Celery's reports ``REJECTED`` or ``IGNORED``, the states nbtask's worker gives
    such a task are reported instead: a task that raised ``Reject`` is a ``FAILURE`` with
    the ``Reject`` as its error (with ``requeue=True`` too: nothing is queued here to put
    back, so it ends as a worker's does once it may put it back no more); one that raised
    ``Ignore`` stays ``STARTED``, with no outcome (not :meth:`ready`, and :meth:`get`
    raises ``TimeoutError`` at once), as a worker leaves its record.

    Attributes
    ----------
    id : str
        The id the run had (``self.request.id``).
    name : str
        The task's registered name.
    retries : int
        How many times the task was retried before this outcome.
    finished_at : float
        When the task ended (epoch seconds).
    """

    def __init__(
        self,
        task_id: str,
        name: str,
        state: State,
        result: Any,
        *,
        traceback: str | None = None,
        retries: int = 0,
    ) -> None:
        self.id = task_id
        self.name = name
        self.retries = retries
        self.finished_at = time.time()
        self._state = state
        self._result = result
        self._traceback = traceback

    @property
    def task_id(self) -> str:
        """Celery's name for :attr:`id`."""
        return self.id

    @property
    def state(self) -> State:
        """``SUCCESS``, ``FAILURE`` if the task raised, ``STARTED`` if it raised ``Ignore``."""
        return self._state

    @property
    def status(self) -> str:
        """Celery's name for :attr:`state`, as a plain string (``"SUCCESS"``)."""
        return self._state.value

    @property
    def result(self) -> Any:
        """The task's return value, or the exception it raised (Celery's attribute)."""
        return self._result

    @property
    def error(self) -> BaseException | None:
        """The exception the task raised; ``None`` after a success."""
        return None if self.successful() else self._result

    @property
    def traceback(self) -> str | None:
        """The traceback text of the task's exception, from its code on; else ``None``."""
        return self._traceback

    @property
    def date_done(self) -> dt.datetime:
        """When the task ended, an aware UTC ``datetime``."""
        return dt.datetime.fromtimestamp(self.finished_at, dt.timezone.utc)

    def ready(self) -> bool:
        """True, unless the task raised ``Ignore``: it has no outcome, as on a worker."""
        return self._state in FINAL_STATES

    def successful(self) -> bool:
        """True if the task returned."""
        return self._state is State.SUCCESS

    def failed(self) -> bool:
        """True if the task raised (the same rule as a handle's ``failed()``)."""
        return self._state in FAILED_STATES

    def get(
        self,
        timeout: float | None = None,
        propagate: bool = True,
        disable_sync_subtasks: bool = True,
    ) -> Any:
        """The task's return value; nothing is waited for.

        Parameters
        ----------
        timeout, disable_sync_subtasks
            Accepted as Celery's are; they change nothing (the task has ended).
        propagate
            Re-raise the task's exception (the default); with ``False``, return it.

        Raises
        ------
        Exception
            The exception the task raised, itself, unless ``propagate=False``.
        TimeoutError
            The task raised ``Ignore``: it has no outcome to wait for (a worker's handle
            of it waits out its timeout).
        """
        if not self.ready():
            raise TimeoutError(
                f"task {self.name}[{self.id}] raised Ignore: it has no outcome, and is "
                f"{self.status} for ever (as on a worker)"
            )
        error = self.error
        if error is not None and propagate:
            raise error
        return self._result

    def wait(
        self,
        timeout: float | None = None,
        propagate: bool = True,
        disable_sync_subtasks: bool = True,
    ) -> Any:
        """Celery's older name for :meth:`get`.

        Parameters
        ----------
        timeout, propagate, disable_sync_subtasks
            As for :meth:`get`.
        """
        return self.get(timeout, propagate, disable_sync_subtasks)

    def __str__(self) -> str:
        """Celery's: the task id."""
        return self.id

    def __repr__(self) -> str:
        return f"<EagerResult {self.name}[{self.id}] {self.status}>"


def run_here(
    task: HandledTask,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    *,
    task_id: str,
    retries: int = 0,
    throw: bool = False,
) -> EagerResult:
    """Run ``task`` here until it returns, fails, or has no retry left (``Task.apply``).

    A retry (``raise self.retry()``, or an exception in ``autoretry_for``) runs the task
    again at once, with ``self.request.retries`` one more and the same id (and the
    arguments the retry gave, if any).

    Raises
    ------
    Exception
        The task's exception, with ``throw``, after its handlers ran.
    """
    parent = current_request()
    while True:
        request = Request(
            id=task_id,
            name=task.name,
            args=args,
            kwargs=kwargs,
            queue="",
            hostname=socket.gethostname(),
            retries=retries,
            parent_id=parent.id if parent is not None else None,
            root_id=(parent.root_id or parent.id) if parent is not None else task_id,
            delivery_info={"is_eager": True},
            is_eager=True,
            in_worker=parent is not None and parent.in_worker,
        )
        # The request stays current until the outcome is decided: a retry reads it.
        with running(request), task_running(task):
            outcome = _run_once(task, request)
        if not (isinstance(outcome, ExceptionInfo) and isinstance(outcome.exception, Retry)):
            break
        retry = outcome.exception
        cause = retry.exc if retry.exc is not None else retry
        log.info("task %s[%s] retry: %s", task.name, task_id, cause)
        einfo = exception_info(cause)
        call_handlers(
            log, task, State.RETRY, task_id, args, kwargs, exc=cause, einfo=einfo, request=request
        )
        retries += 1
        # retry(args=..., kwargs=...): the next run's arguments, as in Celery.
        args = args if retry.new_args is None else retry.new_args
        kwargs = kwargs if retry.new_kwargs is None else retry.new_kwargs
    label = f"{task.name}[{task_id}]"
    if not isinstance(outcome, ExceptionInfo):
        call_handlers(
            log, task, State.SUCCESS, task_id, args, kwargs, retval=outcome.value, request=request
        )
        return EagerResult(task_id, task.name, State.SUCCESS, outcome.value, retries=retries)
    exc, tb = outcome.exception, user_traceback(outcome.exception)
    if isinstance(exc, TaskPredicate):
        return _set_aside(task.name, task_id, exc, tb, retries=retries, throw=throw)
    log_failure(log, task, f"task {label} raised {type(exc).__name__}: {exc}", exc, tb)
    call_handlers(
        log, task, State.FAILURE, task_id, args, kwargs, exc=exc, einfo=outcome, request=request
    )
    if throw:
        raise exc
    return EagerResult(task_id, task.name, State.FAILURE, exc, traceback=tb, retries=retries)


def _set_aside(
    name: str, task_id: str, exc: TaskPredicate, tb: str, *, retries: int, throw: bool
) -> EagerResult:
    """The end of a run that raised ``Reject`` or ``Ignore``: no handler runs, as on a worker.

    ``Ignore`` leaves it ``STARTED``, with no outcome; ``Reject`` fails it (see
    :class:`EagerResult`), and is raised with ``throw``.
    """
    label = f"{name}[{task_id}]"
    if isinstance(exc, Ignore):
        log.info("task %s ignored", label)
        return EagerResult(task_id, name, State.STARTED, exc, retries=retries)
    log.warning("task %s rejected: %s", label, exc)
    if throw:
        raise exc
    return EagerResult(task_id, name, State.FAILURE, exc, traceback=tb, retries=retries)


class _Returned:
    """A run's return value (kept apart from an :class:`ExceptionInfo` it might be)."""

    def __init__(self, value: Any) -> None:
        self.value = value


def _run_once(task: HandledTask, request: Request) -> _Returned | ExceptionInfo:
    """One run of the task: its return value, or what it raised (a ``Retry`` for a retry).

    ``KeyboardInterrupt`` and ``SystemExit`` are not the task's outcome: they end the
    caller's wait, as with Celery's ``apply``.
    """
    args, kwargs = request.args, request.kwargs
    call_handler(log, task.before_start, request.id, args, kwargs)
    try:
        retval = task.call_from_run(args, kwargs)
        if inspect.iscoroutine(retval):  # an ``async def`` task: run it to its end here
            retval = _finish(retval)
        return _Returned(retval)
    except Exception as raised:
        exc: Exception = raised
    if autoretries(task, exc):
        try:
            task.retry(exc=exc, **autoretry_kwargs(task))
        except Exception as decided:
            exc = decided
    return exception_info(exc)


def _finish(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coroutine`` to its end; on a thread of its own if this one runs an event loop.

    A notebook's kernel runs cells inside its event loop, where ``asyncio.run`` refuses.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    context = contextvars.copy_context()  # self.request, inside the coroutine too
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nbtask-apply") as pool:
        return pool.submit(context.run, asyncio.run, coroutine).result()
