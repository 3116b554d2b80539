"""Celery's ``Reject`` and ``Ignore`` raised by task code, on a real worker.

``Ignore``: nothing stored beyond what the task did (its record stays ``STARTED``), the
message acknowledged, no handler called. ``Reject``: no handler, no automatic retry; the
task fails with it, or with ``requeue=True`` runs again later, at most
``max_redeliveries`` times before it fails so (never a hot loop).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until

import nbtask
from nbtask import App, Reject, State
from tests.predicate_tasks import ignored, notes, rejected

pytestmark = pytest.mark.brokers

TASKS = "tests.predicate_tasks"


def test_ignore_stores_nothing_acknowledges_and_calls_no_handler(
    app: App, start_worker: Any, tmp_path: Path
) -> None:
    worker = start_worker("-A", TASKS, concurrency=1)
    early, late = tmp_path / "early", tmp_path / "late"
    handles = [
        app.send_task(f"{TASKS}.ignored", (str(early),)),
        app.send_task(f"{TASKS}.ignored", (str(late),), acks_late=True),
    ]
    wait_until(lambda: worker.log.read_text().count("] ignored") == 2, 15, "both ignored")
    assert app.send_task("tests.sample_tasks.add", (1, 2)).get(timeout=10) == 3  # slot free
    for h, path in zip(handles, (early, late), strict=True):
        with pytest.raises(TimeoutError):
            h.get(timeout=1)  # no outcome, ever: Celery's Ignore
        assert h.state is State.STARTED and app.handle(h.id).state is State.STARTED
        assert h.stdout == "ran, then ignored\n"
        assert notes(path) == ["run"]  # no handler; acknowledged, so never run again


def test_a_task_ignored_before_it_sent_anything_shows_started_on_every_broker(
    app: App, start_worker: Any
) -> None:
    """Its record says ``STARTED``, and so does its handle. Before, on RabbitMQ the handle
    stayed ``PENDING``: the run skipped its ``started`` event, which a final event (none
    comes after ``Ignore``) would have stood for."""
    worker = start_worker("-A", TASKS, concurrency=1)
    handles = [app.send_task(f"{TASKS}.ignored_at_once") for _ in range(3)]
    wait_until(lambda: worker.log.read_text().count("] ignored") == 3, 15, "all ignored")
    for h in handles:
        wait_until(lambda h=h: h.state is State.STARTED, 10, "the handle to show STARTED")
        assert app.handle(h.id).state is State.STARTED and not h.ready()
        assert h.info["worker"] and h.info["pid"]


def test_update_state_to_an_end_is_refused_so_the_handle_ends_as_it_shows(
    app: App, start_worker: Any
) -> None:
    """Celery's ``update_state(state="FAILURE", meta=...)`` then ``raise Ignore()``: refused
    in the task, which fails saying what to do. Before, the handle said ``FAILURE`` (or
    ``SUCCESS``) while ``ready()`` was false and ``get()`` timed out, "still FAILURE"."""

    @app.task(bind=True)
    def ends_itself(self: nbtask.Task, state: str) -> None:
        self.update_state(state=state, meta={"exc_type": "ValueError", "exc_message": ["x"]})
        raise nbtask.Ignore()

    start_worker()
    for state in (State.FAILURE, "SUCCESS", "REVOKED"):
        h = ends_itself.delay(state)
        said = rf"update_state\(state='{state}'\) is a task's end.*raise the exception"
        with pytest.raises(nbtask.ConfigurationError, match=said):
            h.get(timeout=15)
        assert (h.state, h.ready(), h.failed()) == (State.FAILURE, True, True)
        assert app.handle(h.id).state is State.FAILURE
    applied = ends_itself.apply(("FAILURE",))
    assert applied.ready() and applied.failed()
    assert isinstance(applied.result, nbtask.ConfigurationError)


def test_reject_fails_the_task_without_handlers_or_autoretry(
    app: App, start_worker: Any, tmp_path: Path
) -> None:
    start_worker("-A", TASKS)
    path = tmp_path / "notes"
    h = app.send_task(f"{TASKS}.rejected", (str(path),), acks_late=True)
    with pytest.raises(Reject, match="bad input"):
        h.get(timeout=10)
    assert h.state is State.FAILURE and isinstance(h.error, nbtask.Reject)
    assert notes(path) == ["run"]


def test_reject_with_requeue_runs_again_and_is_bounded(
    app: App, start_worker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NBTASK_MAX_REDELIVERIES", "1")  # for the worker
    worker = start_worker("-A", TASKS)
    once, always = tmp_path / "once", tmp_path / "always"
    first = app.send_task(f"{TASKS}.rejects_once", (str(once),), acks_late=True)
    second = app.send_task(f"{TASKS}.rejects_always", (str(always),))
    assert first.get(timeout=20) == 2
    with pytest.raises(Reject, match="never"):
        second.get(timeout=20)
    # The handler of the run that returned (it runs once that run's outcome is sent).
    wait_until(lambda: "after_return" in notes(once), 10, "the returning run's handler")
    assert notes(once) == ["run", "run", "after_return"]
    assert notes(always) == ["run", "run"]  # put back once (max_redeliveries=1), then failed
    assert "rejected and put back on its queue (never)" in worker.log.read_text()


def test_reject_with_requeue_is_bounded_whatever_the_logging_level(
    app: App, start_worker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The times a task was put back are not counted from what the worker logs."""
    monkeypatch.setenv("NBTASK_MAX_REDELIVERIES", "1")  # for the worker
    start_worker("-A", TASKS, "-l", "ERROR")
    path = tmp_path / "always"
    h = app.send_task(f"{TASKS}.rejects_always", (str(path),))
    with pytest.raises(Reject, match="never"):
        h.get(timeout=20)
    assert h.state is State.FAILURE
    assert notes(path) == ["run", "run"]  # put back once (max_redeliveries=1), then failed


def test_a_task_revoked_while_it_runs_is_not_run_again_when_it_rejects_with_requeue(
    app: App, start_worker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Celery drops the message of a revoked task when it comes back: its state REVOKED."""
    monkeypatch.setenv("NBTASK_MAX_REDELIVERIES", "1")  # for the worker
    worker = start_worker("-A", TASKS)
    path, go = tmp_path / "notes", tmp_path / "go"
    h = app.send_task(f"{TASKS}.rejects_once_told", (str(path), str(go)))
    wait_until(lambda: notes(path) == ["run"], 15, "the task running")
    assert app.revoke(h.id) is False  # running: it runs on
    go.touch()
    with pytest.raises(nbtask.TaskRevoked):
        h.get(timeout=20)
    assert app.handle(h.id).state is State.REVOKED
    # Its message, put back, comes back after its delay and is dropped: never run again.
    dropped = f"dropped a message for task {h.id}: it is already REVOKED"
    wait_until(lambda: dropped in worker.log.read_text(), 15, "its message dropped")
    assert notes(path) == ["run"]
    assert app.send_task("tests.sample_tasks.add", (1, 2)).get(timeout=10) == 3
    assert app.handle(h.id).state is State.REVOKED


def test_apply_ends_reject_and_ignore_as_a_worker_does(
    app: App, start_worker: Any, tmp_path: Path
) -> None:
    worker = start_worker("-A", TASKS, concurrency=1)
    sent, here = tmp_path / "rejected-sent", tmp_path / "rejected-here"
    h = app.send_task(f"{TASKS}.rejected", (str(sent),))
    with pytest.raises(Reject, match="bad input"):
        h.get(timeout=10)
    eager = rejected.apply((str(here),))
    assert eager.state is h.state is State.FAILURE
    assert type(eager.result) is type(h.error) is Reject
    assert notes(here) == notes(sent) == ["run"]

    sent, here = tmp_path / "ignored-sent", tmp_path / "ignored-here"
    h = app.send_task(f"{TASKS}.ignored", (str(sent),))
    wait_until(lambda: "] ignored" in worker.log.read_text(), 15, "the task ignored")
    eager = ignored.apply((str(here),))
    assert eager.state is h.state is State.STARTED
    assert not eager.ready() and not h.ready()
    assert notes(here) == notes(sent) == ["run"]
