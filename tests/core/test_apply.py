"""``task.apply()``: Celery's run of a task here, in this process, with an eager result.

The app's broker is a port nothing listens on: a run that touched the broker would fail.
The handler tasks are the ones the worker's tests run (tests.celery_tasks), so the order
and arguments asserted here are those a worker gives.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nbtask import (
    App,
    ConfigurationError,
    EagerResult,
    Ignore,
    MaxRetriesExceededError,
    Reject,
    Retry,
    State,
    Task,
    current_request,
)
from tests.celery_tasks import (
    calls_in_session,
    handled_fail,
    handled_ok,
    handled_retry,
    in_session,
    read_records,
    req_h,
    requests_seen,
)
from tests.predicate_tasks import ignored, notes, rejected, rejects_always

pytestmark = pytest.mark.timeout(60)  # a retry that waited out its countdown would hang


@pytest.fixture
def app() -> Iterator[App]:
    """An app whose broker cannot be reached."""
    application = App("apply", broker_url="redis://127.0.0.1:9/0", insecure=True)
    yield application
    application.close()


def _handlers(path: Path) -> list[str]:
    return [r["h"] for r in read_records(path)]


def test_apply_runs_the_task_here_and_returns_an_eager_result(app: App) -> None:
    @app.task
    def where(x: int, y: int) -> tuple[int, int, int]:
        return x + y, os.getpid(), threading.get_ident()

    result = where.apply((2, 3))
    assert isinstance(result, EagerResult)
    assert result.get() == (5, os.getpid(), threading.get_ident())
    assert result.result == result.get() == result.wait()
    assert (result.state, result.status) == (State.SUCCESS, "SUCCESS")
    assert (result.successful(), result.failed(), result.ready()) == (True, False, True)
    assert result.traceback is None and result.error is None
    assert re.fullmatch(r"[0-9a-f]{32}", result.id) and result.task_id == result.id
    assert result.date_done.tzinfo is not None
    assert repr(result) == f"<EagerResult {where.name}[{result.id}] SUCCESS>"
    assert str(result) == result.id  # Celery's str(EagerResult)
    assert where.apply(kwargs={"x": 1, "y": 1}).get()[0] == 2
    # Calling the task still runs its body alone.
    assert where(1, 2)[0] == 3


def test_a_failed_apply_keeps_the_exception_and_get_raises_it(app: App) -> None:
    @app.task
    def divide(x: int, y: int) -> float:
        return x / y

    result = divide.apply((1, 0))
    assert (result.state, result.status) == (State.FAILURE, "FAILURE")
    assert (result.successful(), result.failed(), result.ready()) == (False, True, True)
    assert isinstance(result.result, ZeroDivisionError) and result.error is result.result
    with pytest.raises(ZeroDivisionError) as raised:
        result.get()
    assert raised.value is result.result
    assert result.get(propagate=False) is result.result
    traceback = result.traceback
    assert traceback is not None
    assert traceback.startswith("Traceback (most recent call last):")
    assert "return x / y" in traceback and traceback.rstrip().endswith("division by zero")
    assert "nbtask/core" not in traceback  # from the task's code on
    with pytest.raises(ZeroDivisionError):
        divide.apply((1, 0), throw=True)
    # A call that does not fit the function fails as the task, as Celery's apply does.
    assert isinstance(divide.apply((1,)).result, TypeError)


def test_a_bound_task_has_its_request_in_apply(app: App) -> None:
    @app.task(bind=True)
    def introspect(self: Task, x: int, *, y: int = 0) -> dict[str, Any]:
        request = self.request
        return {
            "id": request.id,
            "args": request.args,
            "kwargs": dict(request.kwargs),
            "retries": request.retries,
            "is_eager": request.is_eager,
            "root_id": request.root_id,
            "parent_id": request.parent_id,
            "current": current_request() is request,
        }

    seen = introspect.apply((1,), {"y": 2}, task_id="my-eager-id", retries=1).get()
    assert seen == {
        "id": "my-eager-id",
        "args": (1,),
        "kwargs": {"y": 2},
        "retries": 1,
        "is_eager": True,
        "root_id": "my-eager-id",
        "parent_id": None,
        "current": True,
    }
    assert current_request() is None
    assert introspect.request.called_directly  # outside a run: Celery's empty request

    @app.task(bind=True)
    def outer(self: Task) -> tuple[str, dict[str, Any]]:
        return self.request.id, introspect.apply((3,)).get()

    outer_id, inner = outer.apply(task_id="the-outer").get()
    assert (inner["parent_id"], inner["root_id"]) == (outer_id, "the-outer")


def test_handlers_run_in_celerys_order_as_on_a_worker(tmp_path: Path) -> None:
    ok, failed = tmp_path / "ok", tmp_path / "failed"
    assert handled_ok.apply((str(ok), 4), {"scale": 3}).get() == 12
    assert _handlers(ok) == ["before_start", "run", "on_success", "after_return"]
    records = read_records(ok)
    assert records[2]["retval"] == 12 and records[2]["kwargs"] == {"scale": 3}
    assert records[3]["status"] == "SUCCESS"
    assert {r["pid"] for r in records} == {os.getpid()}

    result = handled_fail.apply((str(failed), "bad input"))
    assert str(result.result) == "bad input"
    assert _handlers(failed) == ["before_start", "run", "on_failure", "after_return"]
    failure, after = read_records(failed)[2:]
    assert (failure["exc"], failure["exc_text"], failure["task_id"]) == (
        "ValueError",
        "bad input",
        result.id,
    )
    einfo = failure["einfo"]
    assert einfo.pop("str").endswith("ValueError: bad input\n")  # Celery's str(einfo)
    assert einfo == {
        "class": "ExceptionInfo",
        "type": "ValueError",
        "exception": "ValueError",
        "has_traceback": True,
        "tb_last": "handled_fail",  # Celery's einfo.tb: the traceback object
        "exc_info": True,
    }
    assert (after["status"], after["retval"]) == ("FAILURE", "ValueError")


def test_handlers_see_the_runs_request_in_apply(tmp_path: Path) -> None:
    path = str(tmp_path / "seen")
    result = req_h.apply((path, "fail"), task_id="the-id")
    assert isinstance(result.result, ValueError)
    args = [path, "fail"]
    assert requests_seen(path) == [
        ("before_start", ["the-id", 0, args, False]),
        ("on_retry", ["the-id", 0, args, False]),
        ("before_start", ["the-id", 1, args, False]),
        ("on_failure", ["the-id", 1, args, False]),
        ("after_return", ["the-id", 1, args, False]),
    ]


def test_a_base_classs_own_call_runs_around_apply_and_a_direct_call(tmp_path: Path) -> None:
    # apply() calls the class's own __call__, as a worker does, with the run's request
    # inside (before, apply() called run alone); a direct call goes through it as before.
    path = str(tmp_path / "session")
    assert in_session.apply((path, 3), task_id="the-apply").get() == 3
    assert in_session(path, 4) == 4
    assert [(r["h"], r["request"]) for r in read_records(path)] == [
        ("__call__", ["the-apply", False]),
        ("run", ["the-apply", False, [path, 3]]),
        ("__call__", ["", True]),
        ("run", ["", True, [path, 4]]),
    ]


def test_a_base_classs_own_call_of_a_task_called_as_a_function_in_apply_sees_an_empty_request(
    tmp_path: Path,
) -> None:
    # Called as a function inside another task's run, a task's class's __call__ sees its
    # own empty request, as outside any run (before, the caller's); the caller its own after.
    path = str(tmp_path / "session")
    assert calls_in_session.apply((path,), task_id="the-caller").get() == 5
    assert [(r["h"], r["request"]) for r in read_records(path)] == [
        ("__call__", ["", True]),
        ("run", ["", True, [path, 5]]),
        ("caller", ["the-caller", False]),
    ]


def test_retry_takes_a_queue_and_refuses_other_send_options_saying_why(app: App) -> None:
    # Celery's retry passes send options on to apply_async: queue= is taken (ignored here,
    # where the retry runs in place), Celery's others are refused as apply_async refuses
    # them, any other is a TypeError (before, queue= too: unexpected keyword argument).
    @app.task(bind=True)
    def moves(self: Task, **options: Any) -> str:
        if self.request.retries == 0:
            raise self.retry(countdown=0, **options)
        return self.request.task

    assert moves.apply(kwargs={"queue": "special"}).get() == moves.name
    refused = moves.apply(kwargs={"routing_key": "special"}).result
    assert isinstance(refused, ConfigurationError)
    assert str(refused).startswith("retry(routing_key=...) is Celery's, not nbtask's")
    unknown = moves.apply(kwargs={"bogus": 1}).result
    assert isinstance(unknown, TypeError)
    assert str(unknown) == "retry() got an unexpected keyword argument 'bogus'"
    badly_named = moves.apply(kwargs={"queue": " special"}).result
    assert isinstance(badly_named, ConfigurationError) and "retry(queue=...)" in str(badly_named)


def test_a_task_called_as_a_function_has_celerys_empty_request(app: App) -> None:
    @app.task(bind=True)
    def whoami(self: Task, x: int, *, y: int = 0) -> tuple[Any, ...]:
        r = self.request
        return (r.called_directly, r.id, r.args, dict(r.kwargs), r.retries, r.is_eager)

    assert whoami(1, y=2) == (True, "", (1,), {"y": 2}, 0, False)
    assert whoami.request.called_directly and whoami.request.args == ()

    @app.task(bind=True)
    def flaky(self: Task, cause: bool) -> None:
        raise self.retry(exc=KeyError("gone") if cause else None)

    with pytest.raises(KeyError, match="gone"):  # as Celery's: the cause, nothing sent
        flaky(True)
    with pytest.raises(Retry):
        flaky(False)

    # Called as a function inside a run, a task has its own empty request; the run keeps its.
    @app.task(bind=True)
    def outer(self: Task) -> tuple[Any, ...]:
        inner = whoami(5)
        return (self.request.id, self.request.called_directly, inner)

    assert outer.apply(task_id="the-run").get() == (
        "the-run",
        False,
        (True, "", (5,), {}, 0, False),
    )


def test_a_retry_runs_again_at_once_in_place(tmp_path: Path) -> None:
    log = tmp_path / "retry"
    finished: list[EagerResult] = []
    # Its countdown (0.1 s) is not waited out; nor are the hour-long ones of the tests below.
    runner = threading.Thread(target=lambda: finished.append(handled_retry.apply((str(log),))))
    runner.start()
    runner.join(30)
    assert finished, "apply() did not return"
    result = finished[0]
    assert (result.get(), result.retries) == (1, 1)
    assert _handlers(log) == [
        "before_start",
        "run",
        "on_retry",
        "before_start",
        "run",
        "on_success",
        "after_return",
    ]
    records = read_records(log)
    assert (records[2]["exc"], records[2]["exc_text"]) == ("ConnectionError", "flaky")
    assert {r["task_id"] for r in records} == {result.id}
    assert [r["retries"] for r in records if r["h"] == "run"] == [0, 1]


def test_retries_stop_at_max_retries_with_the_cause_or_max_retries_exceeded(app: App) -> None:
    runs: list[int] = []

    @app.task(bind=True, max_retries=2)
    def flaky(self: Task, cause: bool) -> None:
        runs.append(self.request.retries)
        raise self.retry(exc=KeyError("gone") if cause else None, countdown=3600)

    result = flaky.apply((True,))
    assert runs == [0, 1, 2]
    assert isinstance(result.result, KeyError) and result.retries == 2
    runs.clear()
    result = flaky.apply((False,))
    assert runs == [0, 1, 2]
    assert isinstance(result.result, MaxRetriesExceededError)
    with pytest.raises(MaxRetriesExceededError, match=rf"\[{result.id}\] gave up after 2"):
        result.get()


def test_autoretry_for_retries_in_place_and_keeps_the_one_instance(app: App) -> None:
    class Counting(app.Task):
        runs = 0
        retried: list[str]

        def on_retry(self, exc: BaseException, *args: Any) -> None:
            self.retried = [*getattr(self, "retried", []), type(exc).__name__]

    @app.task(
        base=Counting,
        bind=True,
        autoretry_for=(ConnectionError,),
        dont_autoretry_for=(ConnectionRefusedError,),
        retry_kwargs={"max_retries": 3, "countdown": 3600},
    )
    def fetch(self: Any, fail_times: int, refused: bool = False) -> int:
        self.runs += 1
        if refused:
            raise ConnectionRefusedError("no")
        if self.request.retries < fail_times:
            raise ConnectionError("flaky")
        return self.request.retries

    assert fetch.apply((2,)).get() == 2
    assert (fetch.runs, fetch.retried) == (3, ["ConnectionError"] * 2)
    exhausted = fetch.apply((9,))
    assert isinstance(exhausted.result, ConnectionError) and exhausted.retries == 3
    assert fetch.runs == 3 + 4  # the same instance, from apply to apply
    assert isinstance(fetch.apply((0, True)).result, ConnectionRefusedError)
    assert fetch.runs == 3 + 4 + 1


def test_reject_fails_an_apply_with_no_handler_or_autoretry_as_on_a_worker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "rejected"
    with caplog.at_level(logging.INFO, logger="nbtask.apply"):
        result = rejected.apply((str(path),))  # autoretry_for=(Exception,), max_retries=3
    assert (result.state, result.failed(), result.ready(), result.retries) == (
        State.FAILURE,
        True,
        True,
        0,
    )
    assert isinstance(result.result, Reject) and result.error is result.result
    with pytest.raises(Reject, match="bad input"):
        result.get()
    assert notes(path) == ["run"]  # not retried; no on_failure, no after_return
    assert f"task {rejected.name}[{result.id}] rejected: bad input" in caplog.text
    with pytest.raises(Reject, match="bad input"):
        rejected.apply((str(path),), throw=True)
    # Nothing is queued here to put back: it fails as a worker's does once it can no more.
    always = tmp_path / "always"
    result = rejects_always.apply((str(always),))
    assert result.state is State.FAILURE and isinstance(result.result, Reject)
    assert notes(always) == ["run"]


def test_ignore_leaves_an_apply_started_with_no_outcome_as_on_a_worker(tmp_path: Path) -> None:
    path = tmp_path / "ignored"
    result = ignored.apply((str(path),), throw=True)  # not a failure: nothing to throw
    assert (result.state, result.status) == (State.STARTED, "STARTED")
    assert (result.ready(), result.successful(), result.failed()) == (False, False, False)
    assert isinstance(result.result, Ignore)
    with pytest.raises(TimeoutError, match=r"raised Ignore.*no outcome"):
        result.get()
    with pytest.raises(TimeoutError):
        result.get(propagate=False)
    assert notes(path) == ["run"]  # no handler


def test_a_failure_is_logged_in_one_line_when_throws_expects_it(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    @app.task(throws=(KeyError,))
    def lookup(key: str) -> None:
        raise KeyError(key) if key else ValueError("empty key")

    with caplog.at_level(logging.INFO, logger="nbtask.apply"):
        expected = lookup.apply(("k",))
        unexpected = lookup.apply(("",))
    lines = {r.levelname: r.getMessage() for r in caplog.records if r.name == "nbtask.apply"}
    assert lines["INFO"] == (
        f"task {lookup.name}[{expected.id}] raised KeyError: 'k' (expected: in its throws)"
    )
    assert lines["ERROR"].startswith(f"task {lookup.name}[{unexpected.id}] raised ValueError")
    assert "Traceback (most recent call last)" in lines["ERROR"]


def test_a_failing_handler_is_logged_and_the_outcome_kept(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    class Faulty(app.Task):
        def on_success(self, *args: Any) -> None:
            raise RuntimeError("handler boom")

    @app.task(base=Faulty)
    def one() -> int:
        return 1

    with caplog.at_level(logging.ERROR, logger="nbtask.apply"):
        assert one.apply().get() == 1
    assert "handler on_success raised" in caplog.text


def test_apply_refuses_what_it_cannot_do_here_and_ignores_where_to_send(app: App) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(ConfigurationError, match=r"apply\(\) sends nothing.*second\.apply"):
        add.apply((1, 2), link=add.s(3))
    with pytest.raises(TypeError, match="unexpected keyword argument 'on_event'"):
        add.apply((1, 2), on_event=print)
    with pytest.raises(ConfigurationError, match=r"apply\(args=\.\.\.\) takes a tuple"):
        add.apply("12")
    with pytest.raises(ConfigurationError, match="retries"):
        add.apply((1, 2), retries=-1)
    with pytest.raises(ConfigurationError, match="task_id="):
        add.apply((1, 2), task_id="not an id")
    options = {"queue": "gpu", "countdown": 3600, "expires": 1, "priority": 9, "headers": {}}
    assert add.apply((1, 2), **options).get() == 3

    @app.task(requires=("table",))
    def rows(table: list[int]) -> int:
        return len(table)

    with pytest.raises(ConfigurationError, match=r"requires dataset 'table'.*pass it yourself"):
        rows.apply()
    assert rows.apply(kwargs={"table": [1, 2]}).get() == 2


def test_an_async_task_runs_to_its_end_in_apply(app: App) -> None:
    @app.task(bind=True)
    async def later(self: Task, x: int) -> tuple[int, str]:
        return x * 2, self.request.id

    result = later.apply((4,), task_id="async-one")
    assert result.get() == (8, "async-one")

    async def in_a_running_loop() -> Any:  # as a notebook cell runs: asyncio.run refuses
        return later.apply((5,), task_id="async-two").get()

    assert asyncio.run(in_a_running_loop()) == (10, "async-two")
