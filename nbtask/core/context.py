"""What a running task knows about itself: its request, and how it reports progress."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from typing import Any, TypeVar

from nbtask.brokers.base import Store
from nbtask.core.bound import Bound
from nbtask.core.current import running_task
from nbtask.core.holding import Holding
from nbtask.wire.envelope import Signer

__all__ = [
    "CELL_FRAMES",
    "PARTIAL_RESULT",
    "SHOWN_TRACEBACK",
    "Request",
    "current_request",
    "directly_called",
    "entering_run",
    "own_request",
    "progress",
    "request_of",
    "run_entering",
    "run_started",
    "running",
    "runs_started",
    "track",
]

#: An exception raised by task code may carry, under this attribute, what the task did
#: before it failed (a notebook cell's names): it travels with the failure, signed.
PARTIAL_RESULT = "__nbtask_partial__"
#: ... and, under this one, its traceback as a notebook would show it (IPython's coloured
#: lines, a list of str): the FAILURE event carries it as ``shown_traceback``.
SHOWN_TRACEBACK = "__nbtask_shown_traceback__"
#: ... and a cell's ``SyntaxError``, under this one, the frames of the cell it passed
#: through (``(filename, lineno, name, line)``, none when the cell's statement did not
#: compile): it travels with the exception, and the notebook shows them as its own.
CELL_FRAMES = "__nbtask_cell_frames__"


@dataclasses.dataclass(frozen=True)
class Request:
    """What a running task knows about its own execution (``self.request``)."""

    id: str
    name: str
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    queue: str
    hostname: str
    retries: int = 0
    eta: float | None = None
    expires: float | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None
    parent_id: str | None = None
    root_id: str | None = None
    delivery_info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: True when the task runs in its caller's process (``Task.apply``), not on a worker.
    is_eager: bool = False
    #: False only for a run outside any worker (``Task.apply`` in a client): waiting there
    #: for another task's result blocks no worker slot.
    in_worker: bool = True
    #: Sends the task's events to its client: ``emit(kind, data)``.
    emit: Callable[[str, Mapping[str, Any]], None] | None = None
    #: Where large values are kept as blobs (``put_blobs``, ``get_blob``).
    blob_store: Store | None = None
    #: The values this worker process holds live (:mod:`nbtask.core.holding`).
    holding: Holding | None = None
    #: Seals the kept values' blobs this process writes, and checks those it reads.
    signer: Signer | None = None
    #: The channel of the client that sent the task ("" where none did): who can name
    #: the values it keeps (:func:`~nbtask.core.holding.session_namer`).
    client: str = ""
    #: True when the task was called as a function (``add(1, 2)``) or its request is read
    #: outside a run (Celery's empty ``Context``): no id, no worker.
    called_directly: bool = False

    @property
    def task(self) -> str:
        """Celery's name for :attr:`name`: the task's registered name."""
        return self.name


def directly_called(
    name: str, args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] | None = None
) -> Request:
    """The request of a task called as a function, or read outside a run: Celery's empty one.

    ``called_directly`` is True, the id, queue and hostname are empty, ``args`` and
    ``kwargs`` are the call's.
    """
    return Request(
        id="",
        name=name,
        args=args,
        kwargs=dict(kwargs or {}),
        queue="",
        hostname="",
        in_worker=False,
        called_directly=True,
    )


T = TypeVar("T")

_current: contextvars.ContextVar[Request | None] = contextvars.ContextVar(
    "nbtask_request", default=None
)


# The request one task object sees as its own (``self.request``) apart from the run
# current here: while it is called as a function, and in its handlers after its run.
# Innermost last: a handler may call another task as a function.
_own: contextvars.ContextVar[tuple[tuple[object, Request], ...]] = contextvars.ContextVar(
    "nbtask_own_request", default=()
)

# The task whose own ``__call__`` a run (a worker's, ``apply()``'s) is calling: the base
# class's ``__call__`` then keeps the run's request, not a direct call's (Celery's order).
_entering: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "nbtask_entering_run", default=None
)

_started = [0]  # tasks and other code of the user's begun here: see runs_started()


def current_request() -> Request | None:
    """The request of the task running in this context, or ``None`` outside a task."""
    return _current.get()


def runs_started() -> int:
    """How many tasks this process has begun to run (a forked process counts on).

    Code of the user's that runs outside a task counts too (see :func:`run_started`): a
    cell finds the process's state as the cell before left it only if none ran since.
    """
    return _started[0]


def run_started() -> None:
    """Count code of the user's that runs here outside a task (a dataset's loader) as a run."""
    _started[0] += 1


def running(request: Request) -> Bound[Request | None]:
    """Run the ``with`` block as the task ``request`` describes (a worker does this).

    Marked with :func:`~nbtask.core.current.task_running` too: only that task sees
    ``request`` as its ``self.request`` (see :func:`request_of`).
    """
    run_started()
    return Bound(_current, request)


@contextlib.contextmanager
def own_request(task: object, request: Request) -> Iterator[None]:
    """Let ``task`` alone see ``request`` as its ``self.request`` for the block.

    Nothing else changes: progress, waiting for results and sending keep to the run
    current here, if any (a task called as a function inside another's run reports the
    outer run's progress).
    """
    token = _own.set((*_own.get(), (task, request)))
    try:
        yield
    finally:
        _own.reset(token)


def request_of(task: object) -> Request | None:
    """What ``task`` sees as its own request: set by :func:`own_request`, else its run's.

    The run current here is another task's when ``task`` is called as a function inside
    it (its class's own ``__call__`` is entered before the base class's can set its
    request), or read by another task's code: then ``task`` has none (``None``), as each
    Celery task has its own request stack.
    """
    for owner, request in reversed(_own.get()):
        if owner is task:
            return request
    return _current.get() if running_task() is task else None


def entering_run(task: object | None) -> Bound[object | None]:
    """Mark ``task``'s ``__call__`` in the ``with`` block as a run's call of its code.

    ``None`` ends the mark: a direct call of the task inside its own code is a direct call.
    """
    return Bound(_entering, task)


def run_entering(task: object) -> bool:
    """Whether ``task`` is being called by a run, through its class's own ``__call__``."""
    return _entering.get() is task


def progress(done: float, total: float | None = None, message: str = "") -> None:
    """Report progress of the running task; does nothing outside a task.

    Parameters
    ----------
    done
        Units of work done so far.
    total
        Units of work in all, if known.
    message
        A short note shown beside the progress bar.
    """
    request = _current.get()
    if request is not None and request.emit is not None:
        request.emit("progress", {"done": done, "total": total, "message": message})


def track(iterable: Iterable[T], total: int | None = None, message: str = "") -> Iterator[T]:
    """Yield from ``iterable``, reporting progress after each item (like ``tqdm``).

    Parameters
    ----------
    iterable
        What to loop over.
    total
        Number of items; taken from ``len(iterable)`` when it has one.
    message
        Shown beside the progress bar.
    """
    if total is None and isinstance(iterable, Sized):
        total = len(iterable)
    progress(0, total, message)
    for done, item in enumerate(iterable, start=1):
        yield item
        progress(done, total, message)
