"""The :class:`Task` base class, signatures, and the context a running task sees."""

from __future__ import annotations

import contextvars
import dataclasses
import datetime as dt
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from nbtask.errors import ConfigurationError

if TYPE_CHECKING:
    from nbtask.app import App
    from nbtask.handle import TaskHandle

__all__ = [
    "TASK_OPTIONS",
    "Request",
    "Signature",
    "Task",
    "current_request",
    "progress",
    "track",
]

# Options @app.task accepts; anything else is refused at decoration time.
TASK_OPTIONS = frozenset({"name", "bind", "base", "queue", "acks_late", "ignore_result", "expires"})


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
    parent_id: str | None = None
    root_id: str | None = None
    delivery_info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    emit: Callable[[str, Mapping[str, Any]], None] | None = None


T = TypeVar("T")

_current: contextvars.ContextVar[Request | None] = contextvars.ContextVar(
    "nbtask_request", default=None
)


def current_request() -> Request | None:
    """The request of the task running in this context, or ``None`` outside a task."""
    return _current.get()


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


class Task:
    """A unit of work that workers run; subclass it for custom task classes.

    ``@app.task`` makes a subclass whose ``run`` is the decorated function and returns
    its single instance. A worker process keeps one instance per task, so attributes set
    on ``self`` (a cached connection, a loaded model) survive from call to call.
    """

    name: ClassVar[str] = ""
    queue: ClassVar[str | None] = None
    acks_late: ClassVar[bool] = False
    ignore_result: ClassVar[bool] = False
    expires: ClassVar[float | None] = None
    bind: ClassVar[bool] = False
    # Abstract classes (the app's Task base, user base classes) are never registered.
    abstract: ClassVar[bool] = True

    app: App | None = None

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """The task's body; override it (``@app.task`` does this for you)."""
        raise NotImplementedError(f"{type(self).__name__}.run is not implemented")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task here, in this process."""
        return self.run(*args, **kwargs)

    @property
    def request(self) -> Request:
        """The current execution's request; only inside a running task."""
        request = _current.get()
        if request is None:
            raise RuntimeError(f"{self.name}.request is only available while the task runs")
        return request

    def update_progress(self, done: float, total: float | None = None, message: str = "") -> None:
        """Report progress from inside the running task (see :func:`nbtask.progress`)."""
        progress(done, total, message)

    # Calling -------------------------------------------------------------------------------
    def delay(self, *args: Any, **kwargs: Any) -> TaskHandle:
        """Send the task with these arguments; shortcut for :meth:`apply_async`."""
        return self.apply_async(args, kwargs)

    def apply_async(
        self,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        countdown: float | None = None,
        eta: dt.datetime | float | None = None,
        expires: dt.datetime | float | None = None,
        task_id: str | None = None,
    ) -> TaskHandle:
        """Send the task to a worker and return its handle at once.

        Parameters
        ----------
        args, kwargs
            Arguments for ``run``; anything cloudpickle can serialise.
        queue
            Queue to send to, instead of the task's own.
        countdown
            Run no earlier than this many seconds from now.
        eta
            Run no earlier than this time (an aware ``datetime`` or epoch seconds).
        expires
            Drop the task unstarted after this time (seconds from now, or a ``datetime``).
        task_id
            Use this id instead of a random one.
        """
        if countdown is not None and eta is not None:
            raise ConfigurationError("pass either countdown or eta, not both")
        due = time.time() + countdown if countdown is not None else _epoch(eta, absolute=True)
        return self._app().send(
            self,
            tuple(args),
            dict(kwargs or {}),
            queue=queue,
            eta=due,
            expires=_epoch(expires if expires is not None else self.expires, absolute=False),
            task_id=task_id,
        )

    def delay_many(self, arg_tuples: Iterable[Sequence[Any]]) -> list[TaskHandle]:
        """Send one task per argument tuple, in a single round trip to the broker."""
        return self._app().send_many(self, [tuple(a) for a in arg_tuples])

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A signature: this task with (some of) its arguments, to send later."""
        return Signature(self, args, kwargs)

    def _app(self) -> App:
        if self.app is None:
            raise ConfigurationError(
                f"task {self.name!r} is not bound to an App; create it with @app.task"
            )
        return self.app

    # Pickling --------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # The app holds connections and threads: a shipped task travels without it.
        state = dict(self.__dict__)
        state.pop("app", None)
        return state

    def __repr__(self) -> str:
        return f"<@task: {self.name}>"


@dataclasses.dataclass(frozen=True)
class Signature:
    """A task plus arguments, ready to send (``task.s(...)``)."""

    task: Task
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def delay(self, *args: Any, **kwargs: Any) -> TaskHandle:
        """Send with extra arguments appended (positional) and merged (keyword)."""
        return self.apply_async(args, kwargs)

    def apply_async(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> TaskHandle:
        """Send with extra arguments and :meth:`Task.apply_async` options."""
        merged = {**self.kwargs, **(kwargs or {})}
        return self.task.apply_async((*self.args, *args), merged, **options)

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.task.name}({', '.join(parts)})"


def _epoch(when: dt.datetime | float | None, *, absolute: bool) -> float | None:
    """Turn a datetime or seconds into epoch seconds (relative seconds unless absolute)."""
    if when is None:
        return None
    if isinstance(when, dt.datetime):
        if when.tzinfo is None:
            raise ConfigurationError("eta/expires datetimes must be timezone-aware")
        return when.timestamp()
    if isinstance(when, (int, float)):
        return float(when) if absolute else time.time() + float(when)
    raise ConfigurationError(f"expected a datetime or a number of seconds, got {when!r}")
