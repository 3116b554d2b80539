"""Custom task classes and handlers: one instance per worker process,
class-based tasks, abstract bases, Celery's handler arguments and order, faulty handlers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for_housekeeping, wait_until

from nbtask import App, ConfigurationError, RemoteError, State
from tests import celery_tasks
from tests.celery_tasks import read_records

pytestmark = pytest.mark.brokers

USE_DB = "tests.celery_tasks.use_db"
ADD_TASK = "tests.celery_tasks.AddTask"
DOUBLED_ADD = "tests.celery_tasks.DoubledAddTask"
NAMED_ADD = "tests.celery_tasks.named_add"
HANDLED_OK = "tests.celery_tasks.handled_ok"
HANDLED_FAIL = "tests.celery_tasks.handled_fail"
HANDLED_RETRY = "tests.celery_tasks.handled_retry"
HANDLED_STUCK = "tests.celery_tasks.handled_stuck"
FAULTY_OK = "tests.celery_tasks.faulty_ok"
FAULTY_FAIL = "tests.celery_tasks.faulty_fail"
SLOW_HANDLER = "tests.celery_tasks.slow_handler"
REQ_H = "tests.celery_tasks.req_h"
IN_SESSION = "tests.celery_tasks.in_session"
CALLS_IN_SESSION = "tests.celery_tasks.calls_in_session"
CLASS_RATED = "tests.celery_tasks.class_rated"


def _per_process(results: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for result in results:
        by_pid.setdefault(result["pid"], []).append(result)
    return by_pid


def _assert_one_instance_per_process(results: list[dict[str, Any]]) -> None:
    for pid, seen in _per_process(results).items():
        assert [s["calls"] for s in seen] == list(range(1, len(seen) + 1)), (
            f"process {pid} did not reuse its task instance: {seen}"
        )
        assert len({s["token"] for s in seen}) == 1, f"process {pid} re-created its resource"


# One instance per worker process --------------------------------------------------------------
def test_module_base_class_one_instance_per_process(app: App, start_worker) -> None:
    start_worker("-A", "tests.celery_tasks", concurrency=2)
    # One at a time, so both children get several calls in some order.
    results = [app.send_task(USE_DB).get(timeout=10) for _ in range(8)]
    _assert_one_instance_per_process(results)
    assert sum(len(v) for v in _per_process(results).values()) == 8
    # Sent together too.
    more = [h.get(timeout=10) for h in [app.send_task(USE_DB) for _ in range(8)]]
    _assert_one_instance_per_process(results + more)


def test_shipped_base_class_one_instance_per_process(app: App, start_worker) -> None:
    start_worker(concurrency=1)

    class NotebookDb(app.Task):
        _conn: dict | None = None
        calls = 0

        @property
        def conn(self) -> dict:
            if self._conn is None:
                import os
                import uuid

                self._conn = {"token": uuid.uuid4().hex, "pid": os.getpid()}
            return self._conn

    @app.task(base=NotebookDb, bind=True)
    def query(self: NotebookDb, n: int) -> dict:
        import os

        self.calls += 1
        return {"pid": os.getpid(), "calls": self.calls, "token": self.conn["token"], "n": n}

    results = [query.delay(i).get(timeout=10) for i in range(5)]
    assert [r["n"] for r in results] == list(range(5))
    assert len({r["pid"] for r in results}) == 1
    _assert_one_instance_per_process(results)


# Class-based tasks and abstract bases ------------------------------------------------------------
def test_class_based_task_registered_with_register_task(app: App, start_worker) -> None:
    start_worker("-A", "tests.celery_tasks")
    # Registered in the module: the worker knows it by name.
    assert celery_tasks.add_task.name == ADD_TASK
    assert celery_tasks.app.tasks[ADD_TASK] is celery_tasks.add_task
    assert app.send_task(ADD_TASK, (2, 3)).get(timeout=10) == 5

    # Defined here (a notebook's class): registered on the client's app and shipped.
    class MulTask(app.Task):
        name = "local.mul"

        def run(self, x: int, y: int) -> int:
            return x * y

    mul = app.register_task(MulTask())
    assert app.tasks["local.mul"] is mul
    assert mul.delay(6, 7).get(timeout=10) == 42
    assert mul.apply_async((2,), {"y": 5}).get(timeout=10) == 10
    assert mul(3, 3) == 9


def test_a_subclass_of_a_registered_class_is_a_task_of_its_own(app: App, start_worker: Any) -> None:
    start_worker("-A", "tests.celery_tasks")
    # Registered in the module, after the class they derive from: each under its own name.
    assert celery_tasks.add_task.name == ADD_TASK
    assert celery_tasks.doubled_add_task.name == DOUBLED_ADD
    assert celery_tasks.named_add_task.name == NAMED_ADD
    assert app.send_task(ADD_TASK, (2, 3)).get(timeout=10) == 5
    assert app.send_task(DOUBLED_ADD, (2, 3)).get(timeout=10) == 10
    assert app.send_task(NAMED_ADD, (2, 3)).get(timeout=10) == 105

    # Defined here (a notebook's classes): registered on the client's app and shipped.
    class Mul(app.Task):
        def run(self, x: int, y: int) -> int:
            return x * y

    class Square(Mul):
        def run(self, x: int) -> int:
            return super().run(x, x)

    mul, square = app.register_task(Mul()), app.register_task(Square())
    assert square.name == f"{__name__}.{Square.__qualname__}" != mul.name
    assert app.tasks[mul.name] is mul and app.tasks[square.name] is square
    assert square.delay(4).get(timeout=10) == 16
    assert mul.delay(2, 3).get(timeout=10) == 6

    # A name the class was given is inherited, as Celery's: the subclass needs its own.
    class Named(app.Task):
        name = "local.named"

        def run(self) -> int:
            return 1

    class Unnamed(Named):
        def run(self) -> int:
            return 2

    app.register_task(Named())
    with pytest.raises(ConfigurationError, match=r"'local\.named' is already used"):
        app.register_task(Unnamed())


def test_abstract_bases_are_never_registered(app: App, start_worker) -> None:
    worker = start_worker("-A", "tests.celery_tasks")
    names = set(celery_tasks.app.tasks)
    for base in ("DbTask", "Recording", "FaultyHandlers", "SlowSuccess", "Task"):
        assert f"tests.celery_tasks.{base}" not in names
    assert not any(name.endswith((".DbTask", ".Recording", ".Task")) for name in names)
    info = next(i for i in app.workers().values() if i.pid == worker.pid)
    assert USE_DB in info.tasks
    assert ADD_TASK in info.tasks
    assert not any(
        name.endswith((".DbTask", ".Recording", ".FaultyHandlers")) for name in info.tasks
    )

    with pytest.raises(ConfigurationError):
        app.register_task(app.Task())

    class Explicit(app.Task):
        abstract = True

        def run(self) -> None:
            return None

    with pytest.raises(ConfigurationError):
        app.register_task(Explicit())

    class Base(app.Task):
        pass

    @app.task(base=Base)
    def concrete() -> int:
        return 1

    assert list(app.tasks) == [concrete.name]


# Handlers: Celery's arguments in Celery's order -----------------------------------------------
def _handlers(path: Path) -> list[str]:
    return [rec["h"] for rec in read_records(path)]


def test_handlers_on_success_in_order_with_celerys_arguments(
    app: App, start_worker, tmp_path: Path
) -> None:
    start_worker("-A", "tests.celery_tasks", concurrency=1)
    log = tmp_path / "calls"
    h = app.send_task(HANDLED_OK, (str(log), 6), {"scale": 7})
    assert h.get(timeout=10) == 42
    wait_until(lambda: "after_return" in _handlers(log), 10, "after_return")
    records = read_records(log)
    assert [r["h"] for r in records] == ["before_start", "run", "on_success", "after_return"]
    before, _, success, after = records
    assert (before["task_id"], before["args"], before["kwargs"]) == (
        h.id,
        [str(log), 6],
        {"scale": 7},
    )
    assert (success["retval"], success["task_id"], success["args"], success["kwargs"]) == (
        42,
        h.id,
        [str(log), 6],
        {"scale": 7},
    )
    assert (after["status"], after["retval"], after["task_id"], after["args"], after["kwargs"]) == (
        "SUCCESS",
        42,
        h.id,
        [str(log), 6],
        {"scale": 7},
    )
    assert len({r["pid"] for r in records}) == 1


def test_handlers_on_failure_in_order_with_celerys_arguments(
    app: App, start_worker, tmp_path: Path
) -> None:
    start_worker("-A", "tests.celery_tasks", concurrency=1)
    log = tmp_path / "calls"
    h = app.send_task(HANDLED_FAIL, (str(log), "bad thing"))
    with pytest.raises(ValueError, match="bad thing"):
        h.get(timeout=10)
    wait_until(lambda: "after_return" in _handlers(log), 10, "after_return")
    records = read_records(log)
    assert [r["h"] for r in records] == ["before_start", "run", "on_failure", "after_return"]
    failure, after = records[2], records[3]
    assert (
        failure["exc"],
        failure["exc_text"],
        failure["task_id"],
        failure["args"],
        failure["kwargs"],
    ) == ("ValueError", "bad thing", h.id, [str(log), "bad thing"], {})
    assert failure["einfo"]["type"] == "ValueError"
    assert failure["einfo"]["exception"] == "ValueError"
    assert failure["einfo"]["has_traceback"]
    # Celery's einfo.tb, the traceback object (before, AttributeError in on_failure)
    assert (failure["einfo"]["tb_last"], failure["einfo"]["exc_info"]) == ("handled_fail", True)
    text = failure["einfo"]["str"]
    assert text.startswith("Traceback") and text.endswith("ValueError: bad thing\n")
    assert (after["status"], after["retval"], after["task_id"]) == ("FAILURE", "ValueError", h.id)


def test_a_task_killed_past_its_hard_time_limit_has_on_failure_and_after_return_called(
    app: App, start_worker, tmp_path: Path
) -> None:
    """As Celery calls them (in its main process): once, with TimeLimitExceeded and the
    run's arguments and request, in a child process (the supervisor runs no task code).
    Before, neither ran."""
    start_worker("-A", "tests.celery_tasks", concurrency=1)
    log = tmp_path / "calls"
    h = app.send_task(HANDLED_STUCK, (str(log), 7))
    with pytest.raises(RemoteError) as info:
        h.get(timeout=15)
    assert info.value.ename == "TimeLimitExceeded"
    wait_until(lambda: "after_return" in _handlers(log), 15, "after_return")
    wait_for_housekeeping(app)
    wait_for_housekeeping(app)
    records = read_records(log)
    assert [r["h"] for r in records] == ["before_start", "run", "on_failure", "after_return"]
    failure, after = records[2], records[3]
    assert (failure["exc"], failure["task_id"], failure["args"], failure["kwargs"]) == (
        "TimeLimitExceeded",
        h.id,
        [str(log), 7],
        {},
    )
    assert "hard time limit" in failure["exc_text"]
    assert failure["einfo"]["exception"] == "TimeLimitExceeded"
    assert failure["einfo"]["tb_last"] is None  # made by nbtask, never raised in the task
    assert (after["status"], after["retval"], after["task_id"]) == (
        "FAILURE",
        "TimeLimitExceeded",
        h.id,
    )
    assert failure["pid"] != records[1]["pid"]  # not the killed process: its replacement's
    assert h.state is State.FAILURE


def test_handlers_on_retry_then_success(app: App, start_worker, tmp_path: Path) -> None:
    # Celery (celery/app/trace.py): after_return is skipped for RETRY; the retried run
    # gets its own before_start ... after_return.
    start_worker("-A", "tests.celery_tasks", concurrency=1)
    log = tmp_path / "calls"
    h = app.send_task(HANDLED_RETRY, (str(log),))
    assert h.get(timeout=10) == 1
    wait_until(
        lambda: _handlers(log)[-2:] == ["on_success", "after_return"],
        10,
        "the second run's after_return",
    )
    records = read_records(log)
    assert [r["h"] for r in records] == [
        "before_start",
        "run",
        "on_retry",
        "before_start",
        "run",
        "on_success",
        "after_return",
    ]
    retry = records[2]
    assert (retry["exc"], retry["exc_text"], retry["task_id"], retry["args"]) == (
        "ConnectionError",
        "flaky",
        h.id,
        [str(log)],
    )
    assert retry["einfo"]["type"] == "ConnectionError"
    assert [r["retries"] for r in records if r["h"] == "run"] == [0, 1]
    assert records[-1]["status"] == "SUCCESS"


def test_result_is_delivered_before_on_success_runs(app: App, start_worker, tmp_path: Path) -> None:
    start_worker("-A", "tests.celery_tasks", concurrency=1)
    marker, go = tmp_path / "marker", tmp_path / "go"
    try:
        h = app.send_task(SLOW_HANDLER, (str(marker), str(go)))
        pid = h.get(timeout=10)  # while on_success still waits for the go file
        assert h.state is State.SUCCESS
        wait_until(lambda: len(read_records(marker)) == 1, 10, "on_success to start")
        assert read_records(marker)[0]["pid"] == pid
    finally:
        go.touch()
    wait_until(lambda: len(read_records(marker)) == 2, 10, "on_success to finish")


def test_an_exception_in_a_handler_is_logged_and_the_result_kept(app: App, start_worker) -> None:
    worker = start_worker("-A", "tests.celery_tasks", concurrency=1)
    ok = app.send_task(FAULTY_OK, (41,))
    assert ok.get(timeout=10) == 42
    assert ok.state is State.SUCCESS
    failed = app.send_task(FAULTY_FAIL, ("the task's own error",))
    with pytest.raises(KeyError) as info:
        failed.get(timeout=10)
    assert "the task's own error" in str(info.value)  # not the handler's RuntimeError

    def logged() -> str:
        return worker.log.read_text()

    for text in ("on_success handler boom", "on_failure handler boom", "after_return handler boom"):
        wait_until(lambda text=text: text in logged(), 10, f"{text!r} in the worker log")
    assert "handler on_success raised" in logged()
    # ...and in each task's journal, for `nbtask log ID` and `%nbtask log ID`.
    wait_until(
        lambda: any("on_success handler boom" in line for line in app.store.read_journal(ok.id)),
        10,
        "the handler's error in the task's journal",
    )
    # The stored records hold the task's outcome, and the child is still serving.
    assert app.store.get_record(ok.id).state == "SUCCESS"
    assert app.store.get_record(failed.id).state == "FAILURE"
    assert app.send_task(FAULTY_OK, (1,)).get(timeout=10) == 2
    assert worker.process.poll() is None


def test_journals_are_shown_without_control_codes(app: App) -> None:
    # Journals are unsigned: someone with broker access can write one, but it is only text.
    app.store.append_journal("forged", ["\x1b[2Jcleared\tscreen", "plain"])
    assert app.store.read_journal("forged") == ["?[2Jcleared\tscreen", "plain"]


def test_handlers_see_the_runs_request_as_celerys_do(
    app: App, start_worker, tmp_path: Path
) -> None:
    # Celery's handlers run while the task's request is current: self.request there is the
    # run's (before, it raised RuntimeError and the handler was skipped, only logged).
    worker = start_worker("-A", "tests.celery_tasks", concurrency=1)
    for outcome in ("fail", "done"):
        path = str(tmp_path / outcome)
        h = app.send_task(REQ_H, (path, outcome))
        if outcome == "fail":
            with pytest.raises(ValueError, match="fail"):
                h.get(timeout=10)
        else:
            assert h.get(timeout=10) == "done"
        wait_until(lambda p=path: "after_return" in _handlers(Path(p)), 10, "after_return")
        last = "on_failure" if outcome == "fail" else "on_success"
        args = [path, outcome]
        assert celery_tasks.requests_seen(path) == [
            ("before_start", [h.id, 0, args, False]),
            ("on_retry", [h.id, 0, args, False]),
            ("before_start", [h.id, 1, args, False]),
            (last, [h.id, 1, args, False]),
            ("after_return", [h.id, 1, args, False]),
        ]
    assert "raised; the task's outcome is unaffected" not in worker.log.read_text()


def test_a_base_classs_own_call_runs_around_every_run_on_the_worker(
    app: App, start_worker, tmp_path: Path
) -> None:
    # As Celery's worker calls task.__call__: a base class's session opened there is open
    # for every run, and super().__call__ keeps the run's request (before, only a direct
    # call went through it: the worker called run alone).
    start_worker("-A", "tests.celery_tasks", concurrency=1)
    path = str(tmp_path / "session")
    handles = [app.send_task(IN_SESSION, (path, x)) for x in (1, 2)]
    assert [h.get(timeout=10) for h in handles] == [1, 2]
    assert [(r["h"], r["request"]) for r in read_records(path)] == [
        entry
        for h, x in zip(handles, (1, 2), strict=True)
        for entry in (("__call__", [h.id, False]), ("run", [h.id, False, [path, x]]))
    ]


def test_a_base_classs_own_call_of_a_task_called_as_a_function_in_a_run_sees_an_empty_request(
    app: App, start_worker, tmp_path: Path
) -> None:
    # As Celery's: each task has its own request, so a task called as a function inside
    # another's run sees Celery's empty one in its class's __call__ too, and the caller
    # its own again after (before, that __call__ saw the caller's request).
    start_worker("-A", "tests.celery_tasks", concurrency=1)
    path = str(tmp_path / "session")
    handle = app.send_task(CALLS_IN_SESSION, (path,))
    assert handle.get(timeout=10) == 5
    assert [(r["h"], r["request"]) for r in read_records(path)] == [
        ("__call__", ["", True]),
        ("run", ["", True, [path, 5]]),
        ("caller", [handle.id, False]),
    ]


def test_a_rate_limit_a_base_class_sets_runs_as_the_decorators_does(app: App, start_worker) -> None:
    # rate_limit = "100/s" in a class body is converted as @app.task's is (before, kept as
    # a string: every run failed in the worker's rate check, a ResponseError).
    start_worker("-A", "tests.celery_tasks", concurrency=1)
    handles = [app.send_task(CLASS_RATED, (x,)) for x in range(3)]
    assert [h.get(timeout=10) for h in handles] == [0, 1, 2]
