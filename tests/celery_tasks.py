"""Module-level tasks for the Celery Tasks-guide tests (``-A tests.celery_tasks``).

Workers resolve these by name; the tests send them with ``app.send_task(NAME, ...)``.
Handlers and task bodies record what they see as JSON lines in a file named by the
task's first argument, so the tests can read, from the client, what happened on the worker.
"""

from __future__ import annotations

import json
import os
import time
import traceback
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nbtask import App, ExceptionInfo, current_app, current_task

app = App("celery-tasks", insecure=True)

PREFIX = "tests.celery_tasks"


def record(path: str, **entry: Any) -> None:
    """Append one JSON line to ``path`` (one short O_APPEND write: atomic between processes)."""
    with Path(path).open("a") as f:
        f.write(json.dumps({**entry, "pid": os.getpid()}, default=repr) + "\n")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The JSON lines :func:`record` wrote, in order."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


# A custom base class with a lazily created resource (the guide's DatabaseTask) ------------
class DbTask(app.Task):
    """Caches a "connection" on the instance: created once per worker process."""

    _db: dict[str, Any] | None = None
    calls = 0

    @property
    def db(self) -> dict[str, Any]:
        if self._db is None:
            self._db = {"token": uuid.uuid4().hex, "pid": os.getpid()}
        return self._db


@app.task(base=DbTask, bind=True)
def use_db(self: DbTask) -> dict[str, Any]:
    """Count calls on the task instance and return the cached resource's token."""
    self.calls += 1
    return {"pid": os.getpid(), "calls": self.calls, "token": self.db["token"]}


# A class-based task, registered explicitly ------------------------------------------------
class AddTask(app.Task):
    """The guide's class-based task: ``run`` is the body."""

    def run(self, x: int, y: int) -> int:
        return x + y


add_task = app.register_task(AddTask())


class DoubledAddTask(AddTask):
    """A subclass of a registered class: a task of its own, under a name of its own."""

    def run(self, x: int, y: int) -> int:
        return 2 * super().run(x, y)


doubled_add_task = app.register_task(DoubledAddTask())


class NamedAddTask(AddTask):
    """A subclass of a registered class that names itself."""

    name = "tests.celery_tasks.named_add"

    def run(self, x: int, y: int) -> int:
        return 100 + super().run(x, y)


named_add_task = app.register_task(NamedAddTask())


# Handlers, recorded in order ---------------------------------------------------------------
def _einfo(einfo: ExceptionInfo | None) -> dict[str, Any] | None:
    if einfo is None:
        return None
    return {
        "class": type(einfo).__name__,
        "type": einfo.type.__name__,
        "exception": type(einfo.exception).__name__,
        "has_traceback": "Traceback" in einfo.traceback,
        "str": str(einfo),  # Celery's ExceptionInfo: its traceback text
        # Celery's einfo.tb and exc_info: the traceback object, down to the raising frame
        "tb_last": traceback.extract_tb(einfo.tb)[-1].name if einfo.tb is not None else None,
        "exc_info": einfo.exc_info == (einfo.type, einfo.exception, einfo.tb),
    }


class Recording(app.Task):
    """Records every handler call (with its arguments) to the file named by ``args[0]``."""

    def before_start(self, task_id: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        _called("before_start", task_id, args, kwargs)

    def on_success(
        self, retval: Any, task_id: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> None:
        _called("on_success", task_id, args, kwargs, retval=retval)

    def on_failure(
        self,
        exc: BaseException,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        einfo: ExceptionInfo,
    ) -> None:
        _called("on_failure", task_id, args, kwargs, **_raised(exc, einfo))

    def on_retry(
        self,
        exc: BaseException,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        einfo: ExceptionInfo,
    ) -> None:
        _called("on_retry", task_id, args, kwargs, **_raised(exc, einfo))

    def after_return(
        self,
        status: str,
        retval: Any,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        einfo: ExceptionInfo | None,
    ) -> None:
        shown = type(retval).__name__ if isinstance(retval, BaseException) else retval
        _called("after_return", task_id, args, kwargs, status=str(status), retval=shown)


def _called(
    handler: str, task_id: str, args: tuple[Any, ...], kwargs: Mapping[str, Any], **seen: Any
) -> None:
    """Record a handler call: its task, its arguments and what else it was given."""
    record(args[0], h=handler, task_id=task_id, args=list(args), kwargs=dict(kwargs), **seen)


def _raised(exc: BaseException, einfo: ExceptionInfo) -> dict[str, Any]:
    """What an error handler is told of the exception, as recorded."""
    return {"exc": type(exc).__name__, "exc_text": str(exc), "einfo": _einfo(einfo)}


@app.task(base=Recording, bind=True)
def handled_ok(self: Recording, path: str, x: int, *, scale: int = 1) -> int:
    record(path, h="run", task_id=self.request.id, retries=self.request.retries)
    return x * scale


@app.task(base=Recording, bind=True)
def handled_fail(self: Recording, path: str, message: str) -> None:
    record(path, h="run", task_id=self.request.id, retries=self.request.retries)
    raise ValueError(message)


@app.task(base=Recording, bind=True, max_retries=3)
def handled_retry(self: Recording, path: str) -> int:
    """Fails once, is retried at once, then succeeds with its retry count."""
    record(path, h="run", task_id=self.request.id, retries=self.request.retries)
    if self.request.retries == 0:
        raise self.retry(exc=ConnectionError("flaky"), countdown=0.1)
    return self.request.retries


@app.task(base=Recording, bind=True, time_limit=1)
def handled_stuck(self: Recording, path: str, x: int) -> None:
    """Runs past its hard time limit, ignoring everything but SIGKILL."""
    import contextlib
    import time

    record(path, h="run", task_id=self.request.id, pid=os.getpid())
    while True:
        with contextlib.suppress(BaseException):
            time.sleep(30)


class SeesRequest(app.Task):
    """Records what ``self.request`` is in each handler, to the file named by its first argument."""

    def _seen(self, handler: str) -> None:
        r = self.request
        record(r.args[0], h=handler, request=[r.id, r.retries, list(r.args), r.called_directly])

    def before_start(self, task_id: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        self._seen("before_start")

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        self._seen("on_success")

    def on_failure(self, exc: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        self._seen("on_failure")

    def on_retry(self, exc: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        self._seen("on_retry")

    def after_return(self, *args: Any) -> None:
        self._seen("after_return")


@app.task(base=SeesRequest, bind=True, max_retries=1)
def req_h(self: SeesRequest, path: str, outcome: str) -> str:
    """Retried once at once, then returns ``outcome``, or fails if it is ``"fail"``."""
    if self.request.retries == 0:
        raise self.retry(exc=ConnectionError("flaky"), countdown=0)
    if outcome == "fail":
        raise ValueError(outcome)
    return outcome


def requests_seen(path: str | Path) -> list[tuple[str, list[Any]]]:
    """What :class:`SeesRequest` recorded: ``(handler, [id, retries, args, called_directly])``."""
    return [(r["h"], r["request"]) for r in read_records(path)]


class SessionTask(app.Task):
    """Celery's guide's base class that opens a session around every run in ``__call__``."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        r = self.request
        record(args[0], h="__call__", request=[r.id, r.called_directly])
        return super().__call__(*args, **kwargs)


@app.task(base=SessionTask, bind=True)
def in_session(self: SessionTask, path: str, x: int) -> int:
    """Records its own request after its class's ``__call__`` did, and returns ``x``."""
    r = self.request
    record(path, h="run", request=[r.id, r.called_directly, list(r.args)])
    return x


@app.task(bind=True)
def calls_in_session(self: Any, path: str) -> int:
    """Calls :func:`in_session` as a function inside its run, then records its own request."""
    x: int = in_session(path, 5)
    r = self.request
    record(path, h="caller", request=[r.id, r.called_directly])
    return x


class RatedBase(app.Task):
    """A base class setting a task option in its body, in Celery's form."""

    rate_limit = "100/s"


@app.task(base=RatedBase)
def class_rated(x: int) -> int:
    """Returns ``x``, under its base class's rate limit."""
    return x


class FaultyHandlers(app.Task):
    """Every completion handler raises: the task's outcome must still be delivered."""

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        raise RuntimeError("on_success handler boom")

    def on_failure(self, exc: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        raise RuntimeError("on_failure handler boom")

    def after_return(self, *args: Any) -> None:
        raise RuntimeError("after_return handler boom")


@app.task(base=FaultyHandlers)
def faulty_ok(x: int) -> int:
    return x + 1


@app.task(base=FaultyHandlers)
def faulty_fail(message: str) -> None:
    raise KeyError(message)


class SlowSuccess(app.Task):
    """``on_success`` waits for a go file: shows the result is delivered before it runs."""

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        marker, go = args[0], args[1]
        record(marker, h="on_success waiting")
        deadline = time.monotonic() + 15
        while not Path(go).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        record(marker, h="on_success done")


@app.task(base=SlowSuccess)
def slow_handler(marker: str, go: str) -> int:
    return os.getpid()


@app.task
def mark(path: str, label: str) -> str:
    """Record that this task ran (with ``label``) and return the label."""
    record(path, h="ran", label=label)
    return label


# Limits declared on module tasks, sent by name ----------------------------------------------
@app.task(time_limit=1)
def hard_limited_sleep(seconds: float) -> int:
    """Sleep ``seconds``; its hard time limit (1 s) is declared here, on the worker's side."""
    time.sleep(seconds)
    return os.getpid()


# An argument that kills the process loading it, once --------------------------------------
class KillsItsLoader:
    """Pickles to a call that SIGKILLs the process unpickling it, the first time only.

    ``flag`` is a file the first loader creates; a later loader gets the flag's path.
    Copying it (``copy``/``deepcopy``, as sending may) keeps it as it is.
    """

    def __init__(self, flag: str) -> None:
        self.flag = flag

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_load_once, (self.flag,))

    def __copy__(self) -> KillsItsLoader:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> KillsItsLoader:
        return self


def _load_once(flag: str) -> str:
    """SIGKILL this process if ``flag`` did not exist yet (creating it); else return it."""
    import signal

    try:
        fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return flag
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
    return flag  # (never reached)


# Celery's current_task and current_app ------------------------------------------------------
@app.task(bind=True)
def who_runs(self: Any) -> dict[str, Any]:
    """What ``current_task`` and ``current_app`` are inside a task a worker imported."""
    return {
        "task_is_self": current_task._get_current_object() is self,
        "id": current_task.request.id,
        "name": current_task.name,
        "app_is_own": current_app._get_current_object() is app,
        "app_has_it": self.name in current_app.tasks,
    }
