"""Celery's task names beyond nbtask's own: ``apply()`` runs here, the others say what to do.

``add.apply()`` is Celery's run of a task in this process, returning an eager result
(:mod:`nbtask.core.eager`). ``add.map()``, ``add.starmap()`` and ``add.chunks()`` are
Celery's ways to run many calls as one task; on a :class:`~nbtask.Task` each raises an
``AttributeError`` naming nbtask's way, rather than a bare one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from nbtask.core.call_checks import CELERY_SEND_OPTIONS, call_arguments
from nbtask.core.canvas import Signature
from nbtask.core.celery_result import not_in_nbtask
from nbtask.core.eager import EagerResult, run_here
from nbtask.core.handle import TaskHandle
from nbtask.core.handlers import HandledTask
from nbtask.core.options import check_task_id, new_task_id
from nbtask.errors import ConfigurationError

__all__ = ["CeleryTaskNames"]

#: Options of ``apply_async`` (nbtask's and Celery's) that say where and when to send:
#: ``apply()`` takes them and, as Celery's, ignores them, since nothing is sent.
_SEND_ONLY = frozenset(
    {"queue", "countdown", "eta", "expires", "time_limit", "soft_time_limit", "label"}
    | {"logfile", "loglevel", *CELERY_SEND_OPTIONS}
)


class _Named(Protocol):
    """What the Celery aliases use of a task."""

    def signature(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Signature:
        """The long form of ``s()``."""


class _Applied(HandledTask, Protocol):
    """What ``apply()`` uses of a task."""

    @property
    def requires(self) -> tuple[str, ...]:
        """The named datasets the task's workers pass it."""


def _not_in_nbtask(name: str, instead: str) -> AttributeError:
    return not_in_nbtask(f"task.{name}", instead)


class CeleryTaskNames:
    """Celery's task names beyond nbtask's own, mixed into :class:`~nbtask.Task`.

    Those nbtask refuses are typed as the methods they stand for, so a task class may
    define its own (a notebook cell's task has a ``map``).
    """

    def apply(
        self: _Applied,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        task_id: str | None = None,
        retries: int = 0,
        throw: bool = False,
        link: object = None,
        link_error: object = None,
        **options: Any,
    ) -> EagerResult:
        """Run the task here, in this process, now; return its outcome (Celery's ``apply``).

        The task runs on this thread as a worker would run it, and nothing is sent: a
        bound task's ``self.request`` has the id, arguments and retry count
        (``request.is_eager`` is True), ``before_start`` and the handlers run in Celery's
        order, a retry (``raise self.retry()``, or ``autoretry_for``) runs the task again
        at once, up to ``max_retries``, without waiting out its countdown (as Celery's
        ``apply`` does), and a failure is logged (in one line if ``throws`` expects it).
        ``Reject`` and ``Ignore`` end it as on a worker: no handler, no automatic retry
        (see :class:`~nbtask.EagerResult` for the states they leave). Calling the task,
        ``add(2, 2)``, still just runs its body.

        Parameters
        ----------
        args, kwargs
            Arguments for ``run``. A task that requires datasets gets them from its
            workers; here, pass them yourself as keyword arguments.
        task_id
            The run's id (``self.request.id``); a random one by default.
        retries
            The retry count the run starts from (``self.request.retries``).
        throw
            Raise the task's exception from ``apply()`` (after its handlers ran) instead
            of returning a failed result (Celery's ``throw``); a ``Reject`` too, not an
            ``Ignore`` (no failure).
        link, link_error
            Refused: a linked task would be sent to the workers. Apply the next task to
            the result instead: ``second.apply((first.apply(args).get(),))``.
        options
            ``apply_async``'s options that say where and when to send (``queue``,
            ``countdown``, ``eta``, ``expires``, time limits, Celery's ``priority``...):
            taken and ignored, as Celery's ``apply`` does, since nothing is sent.

        Returns
        -------
        EagerResult
            The outcome: ``get()`` (re-raising the task's exception unless
            ``propagate=False``), ``result`` (the value, or the exception), ``state`` and
            ``status``, ``successful()``, ``failed()``, ``ready()``, ``traceback``, ``id``.

        Raises
        ------
        ConfigurationError
            Arguments of the wrong shape, a bad ``task_id`` or ``retries``, ``link``, or
            a required dataset not passed; the task did not run.
        TypeError
            An option ``apply_async`` does not take either.
        """
        unknown = sorted(set(options) - _SEND_ONLY)
        if unknown:
            raise TypeError(f"apply() got an unexpected keyword argument {unknown[0]!r}")
        if link is not None or link_error is not None:
            raise ConfigurationError(
                "apply(link=..., link_error=...) would send the linked task to the workers; "
                "apply() sends nothing: apply the next task to the result instead, "
                "second.apply((first.apply(args).get(),))"
            )
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigurationError(f"apply(retries=...) takes a count >= 0, got {retries!r}")
        call_args, call_kwargs = call_arguments(args, kwargs, "apply")
        missing = [name for name in self.requires if name not in call_kwargs]
        if missing:
            raise ConfigurationError(
                f"task {self.name} requires dataset {missing[0]!r}, which its workers pass; "
                f"apply() runs it here: pass it yourself, apply(args, {{{missing[0]!r}: ...}})"
            )
        return run_here(
            self,
            call_args,
            call_kwargs,
            task_id=new_task_id() if task_id is None else check_task_id(task_id),
            retries=retries,
            throw=bool(throw),
        )

    @property
    def __name__(self) -> str:
        """The name of the task's class: the decorated function's (Celery's ``add.__name__``)."""
        return type(self).__qualname__.rpartition(".")[2]

    def subtask(
        self: _Named,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Signature:
        """Celery's older name for :meth:`~nbtask.Task.signature`."""
        return self.signature(args, kwargs, **options)

    def AsyncResult(self: _Named, task_id: str) -> TaskHandle:
        """Celery's ``task.AsyncResult(id)``: a task's handle by id, :meth:`nbtask.App.handle`.

        Raises
        ------
        TaskNotFound
            The store has no record of that id (Celery's would read ``PENDING``).
        """
        app: Any = getattr(self, "app", None)
        if app is None:
            raise ConfigurationError(f"task {self!r} is not bound to an App; use app.handle(id)")
        handle: TaskHandle = app.handle(task_id)
        return handle

    @property
    def map(self) -> Callable[..., Any]:
        """Not in nbtask: Celery's one task calling this one on each item in turn."""
        raise _not_in_nbtask(
            "map(items)",
            "send one task per item instead, in one round trip: "
            "add.delay_many([(x,) for x in items]), or group(add.s(x) for x in items).delay()",
        )

    @property
    def starmap(self) -> Callable[..., Any]:
        """Not in nbtask: Celery's one task calling this one on each argument tuple."""
        raise _not_in_nbtask(
            "starmap(items)",
            "send one task per argument tuple instead, in one round trip: "
            "add.delay_many(items), or group(add.s(*args) for args in items).delay()",
        )

    @property
    def replace(self) -> Callable[..., Any]:
        """Not in nbtask: Celery's ``self.replace(sig)``, a running task ending as ``sig``."""
        raise _not_in_nbtask(
            "replace(sig)",
            "a running task does not hand its outcome over to another task: run that task's "
            "code here and return its value (return add.run(x, 100)), or have the caller "
            "chain the two: (first.s(x) | add.s(100)).delay()",
        )

    @property
    def chunks(self) -> Callable[..., Any]:
        """Not in nbtask: Celery's split of many calls into tasks of ``n`` calls each."""
        raise _not_in_nbtask(
            "chunks(items, n)",
            "write a task that runs one chunk, @app.task def add_chunk(pairs): return "
            "[x + y for x, y in pairs], and send one per chunk: group(add_chunk.s(items[i:i "
            "+ n]) for i in range(0, len(items), n)).delay()",
        )

    @property
    def backend(self) -> Any:
        """Not in nbtask: Celery's result backend object, ``self.backend`` in a task."""
        raise _not_in_nbtask(
            "backend",
            "a task's state and result go to nbtask's store by themselves; inside a task, "
            "self.update_state(state=..., meta=...) records a state of its own, and a "
            "client reads any task's with app.handle(id) (state, info, get()); "
            "@app.task(backend=None) keeps no result",
        )
