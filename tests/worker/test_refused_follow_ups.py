"""What follows a task its worker refuses to run, and a task whose process is killed after
storing its own failure, on both brokers. A message expired, or made too far in the
worker's future (by less than ``result_ttl``), is not run: its chain's later steps end with
its error (never ``PENDING`` for ever) and its errbacks run once. A message older than
``max_age`` may be a replay: nothing it carries is acted on. A child killed between storing its
task's failure and sending what follows it leaves that to its supervisor (or, on RabbitMQ,
to whoever the message comes back to): the errbacks still run once. So does one killed
between storing its task's success and sending its link and its chain's next step: each is
sent once, with the stored result."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for_housekeeping, wait_until

import nbtask
from nbtask import App, State, TaskHandle
from nbtask.core import outgoing
from tests.celery_tasks import KillsItsLoader, read_records

pytestmark = pytest.mark.brokers


def _tasks(app: App) -> tuple[Any, Any, Any]:
    """A step that notes its run, one that fails, and an errback that notes its call."""

    @app.task
    def step(x: int, path: str) -> int:
        from tests.celery_tasks import record

        record(path, step=x)
        return x + 1

    @app.task
    def fails(x: int, path: str) -> int:
        from tests.celery_tasks import record

        record(path, step=x)
        raise ValueError(f"step {x} fails")

    @app.task
    def note(value: object, path: str, *_: object) -> object:
        from tests.celery_tasks import record

        record(path, value=value)
        return value

    return step, fails, note


def _chain(app: App, first: Any, tmp_path: Path, **options: Any) -> tuple[TaskHandle, TaskHandle]:
    """Send ``first | step | step`` with an errback on ``first``; the last handle, the errback's."""
    step, _, note = _tasks(app)
    ledger, calls = str(tmp_path / "ledger"), str(tmp_path / "calls")
    errback_id = uuid.uuid4().hex
    errback = app.expect(errback_id, note.name)
    head = first.set(link_error=note.s(calls).set(task_id=errback_id), **options)
    return (head | step.s(ledger) | step.s(ledger)).delay(), errback


def _later_steps(last: TaskHandle) -> list[TaskHandle]:
    middle = last.parent
    assert middle is not None and middle.parent is not None
    return [middle, last]


def _first(last: TaskHandle) -> TaskHandle:
    head = _later_steps(last)[0].parent
    assert head is not None
    return head


def _errback_called_once(app: App, errback: TaskHandle, head: TaskHandle, tmp_path: Path) -> None:
    assert errback.get(timeout=20) == head.id
    wait_for_housekeeping(app)
    wait_for_housekeeping(app)
    assert [r["value"] for r in read_records(tmp_path / "calls")] == [head.id]
    assert read_records(tmp_path / "ledger") == []  # no step ran


def test_chain_whose_first_step_expired_ends_its_later_steps_and_calls_its_errback_once(
    app: App, start_worker, tmp_path: Path
) -> None:
    step, _, _ = _tasks(app)
    last, errback = _chain(app, step.s(1, str(tmp_path / "ledger")), tmp_path, expires=0.5)
    head = _first(last)
    time.sleep(1.0)  # expired before any worker takes it
    start_worker(concurrency=1)
    with pytest.raises(nbtask.TaskRevoked):
        head.get(timeout=20)
    for later in _later_steps(last):
        with pytest.raises(nbtask.TaskRevoked) as info:
            later.get(timeout=20)
        assert head.id in str(info.value)
        assert later.state is State.REVOKED
    _errback_called_once(app, errback, head, tmp_path)


def test_a_chain_step_revoked_before_it_is_sent_ends_the_steps_after_it_and_calls_its_errback(
    app: App, start_worker, tmp_path: Path
) -> None:
    """Revoked ahead (as Celery: ``ch.parent.revoke()``), the middle step is never queued:
    the worker of the step before it, which would send it, ends the last step with its
    ``TaskRevoked`` and sends its errback, once. Before, the last step stayed PENDING."""
    step, _, note = _tasks(app)
    ledger, calls = str(tmp_path / "ledger"), str(tmp_path / "calls")
    errback_id = uuid.uuid4().hex
    errback = app.expect(errback_id, note.name)
    middle_step = step.s(ledger).set(link_error=note.s(calls).set(task_id=errback_id))
    last = (step.s(1, ledger) | middle_step | step.s(ledger)).delay()
    middle, head = _later_steps(last)[0], _first(last)
    assert app.revoke(middle.id) is True
    start_worker(concurrency=1)
    assert head.get(timeout=20) == 2
    with pytest.raises(nbtask.TaskRevoked):
        middle.get(timeout=20)
    with pytest.raises(nbtask.TaskRevoked) as info:
        last.get(timeout=20)
    assert middle.id in str(info.value)
    assert last.state is State.REVOKED
    assert errback.get(timeout=20) == middle.id
    wait_for_housekeeping(app)
    wait_for_housekeeping(app)
    assert [r["value"] for r in read_records(calls)] == [middle.id]
    assert [r["step"] for r in read_records(ledger)] == [1]  # only the first step ran


def test_chain_whose_first_step_is_older_than_max_age_has_nothing_it_carries_acted_on(
    app: App, start_worker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past max_age a message may be a replay (its task ran, and what remembered that is
    gone: tests/security/test_replayed_follow_ups.py), so nothing it carries is acted on:
    no errback is sent and its chain's later steps are not ended (they stay PENDING)."""
    monkeypatch.setenv("NBTASK_MAX_AGE", "2.0")  # for the workers (start_worker copies it)
    step, _, _ = _tasks(app)
    last, errback = _chain(app, step.s(1, str(tmp_path / "ledger")), tmp_path)
    head = _first(last)
    time.sleep(2.5)  # older than max_age before any worker takes it
    start_worker(concurrency=1)
    with pytest.raises(nbtask.NbtaskError, match="older than max_age"):
        head.get(timeout=20)
    wait_for_housekeeping(app)
    wait_for_housekeeping(app)
    assert read_records(tmp_path / "calls") == []
    assert not errback.done()
    assert [later.state for later in _later_steps(last)] == [State.PENDING, State.PENDING]
    assert read_records(tmp_path / "ledger") == []


def _clock_ahead(seconds: float) -> Any:
    """The ``time`` module as a client whose clock is ``seconds`` ahead sees it."""

    class ClockAhead:
        @staticmethod
        def time() -> float:
            return time.time() + seconds

    return ClockAhead


def test_chain_whose_first_step_comes_from_the_workers_future_ends_its_later_steps(
    app: App, start_worker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five minutes ahead, within result_ttl (600 s here): the record of its refusal
    outlives the time a copy of the message would be refused so again."""
    step, _, _ = _tasks(app)
    monkeypatch.setattr(outgoing, "time", _clock_ahead(300.0))
    last, errback = _chain(app, step.s(1, str(tmp_path / "ledger")), tmp_path)
    monkeypatch.undo()
    head = _first(last)
    start_worker(concurrency=1)
    with pytest.raises(nbtask.NbtaskError, match="in this worker's future"):
        head.get(timeout=20)
    for later in _later_steps(last):
        with pytest.raises(nbtask.NbtaskError, match="in this worker's future"):
            later.get(timeout=20)
        assert later.state is State.FAILURE
    _errback_called_once(app, errback, head, tmp_path)


def test_a_child_killed_after_storing_its_failure_still_has_its_errback_and_chain_followed(
    app: App, start_worker, tmp_path: Path
) -> None:
    """Loading the errback's arguments (after the failure is stored, before anything that
    follows it is sent) kills the child, once; its supervisor, or the worker the message
    comes back to, sends what is still owed."""
    _, fails, note = _tasks(app)
    worker = start_worker(concurrency=1)
    ledger, calls, flag = (str(tmp_path / name) for name in ("ledger", "calls", "flag"))
    step, _, _ = _tasks(app)
    errback_id = uuid.uuid4().hex
    errback = app.expect(errback_id, note.name)
    dies = note.s(calls, KillsItsLoader(flag)).set(task_id=errback_id)
    last = (fails.s(1, ledger).set(link_error=dies) | step.s(ledger) | step.s(ledger)).delay()
    head = _first(last)
    with pytest.raises(ValueError, match="step 1 fails"):
        head.get(timeout=20)
    wait_until(lambda: Path(flag).exists(), 20, "the child to load the errback")
    for later in _later_steps(last):
        with pytest.raises(ValueError, match="step 1 fails"):
            later.get(timeout=30)
        assert later.state is State.FAILURE
    assert errback.get(timeout=30) == head.id
    wait_for_housekeeping(app)
    wait_for_housekeeping(app)
    assert [r["value"] for r in read_records(calls)] == [head.id]
    assert [r["step"] for r in read_records(ledger)] == [1]  # no later step ran
    assert "exited" in worker.log.read_text() or "died" in worker.log.read_text()


def test_a_child_killed_after_storing_its_success_still_sends_its_chains_next_step_once(
    app: App, start_worker, tmp_path: Path
) -> None:
    """Loading the next step's arguments (after the success is stored, before that step is
    sent) kills the child, once; its supervisor, or the worker the message comes back to,
    sends it with the stored result, once."""
    step, _, _ = _tasks(app)

    @app.task
    def then(x: int, path: str, *_: object) -> int:
        from tests.celery_tasks import record

        record(path, step=x)
        return x + 1

    worker = start_worker(concurrency=1)
    ledger, flag = str(tmp_path / "ledger"), str(tmp_path / "flag")
    last = (step.s(1, ledger) | then.s(ledger, KillsItsLoader(flag)) | step.s(ledger)).delay()
    head = _first(last)
    assert head.get(timeout=20) == 2
    wait_until(lambda: Path(flag).exists(), 20, "the child to load the next step")
    assert last.get(timeout=30) == 4
    assert [later.state for later in _later_steps(last)] == [State.SUCCESS, State.SUCCESS]
    wait_for_housekeeping(app)
    wait_for_housekeeping(app)
    assert [r["step"] for r in read_records(ledger)] == [1, 2, 3]  # each step ran once
    assert "exited" in worker.log.read_text() or "died" in worker.log.read_text()


def test_a_child_killed_after_storing_its_success_still_sends_its_link_once(
    app: App, start_worker, tmp_path: Path
) -> None:
    """The same for a ``link``: loading its arguments kills the child, once; it is sent
    once, given the stored result (a large one, kept out of band)."""
    _, _, note = _tasks(app)

    @app.task
    def large(path: str) -> bytes:
        from tests.celery_tasks import record

        record(path, step=1)
        return b"x" * 4_000_000

    worker = start_worker(concurrency=1)
    ledger, calls, flag = (str(tmp_path / name) for name in ("ledger", "calls", "flag"))
    link_id = uuid.uuid4().hex
    linked = app.expect(link_id, note.name)
    dies = note.s(calls, KillsItsLoader(flag)).set(task_id=link_id)
    head = large.apply_async((ledger,), link=dies)
    assert head.get(timeout=20) == b"x" * 4_000_000
    wait_until(lambda: Path(flag).exists(), 20, "the child to load the link")
    assert linked.get(timeout=30) == b"x" * 4_000_000
    wait_for_housekeeping(app)
    wait_for_housekeeping(app)
    assert len(read_records(calls)) == 1
    assert [r["step"] for r in read_records(ledger)] == [1]
    assert "exited" in worker.log.read_text() or "died" in worker.log.read_text()


def test_chain_whose_first_step_comes_from_further_ahead_than_result_ttl_is_not_followed_up(
    app: App, start_worker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An hour ahead, past result_ttl (600 s here): a copy replayed once the record of
    its refusal is gone would be refused so again, so nothing it carries is acted on."""
    step, _, _ = _tasks(app)
    monkeypatch.setattr(outgoing, "time", _clock_ahead(3600.0))
    last, errback = _chain(app, step.s(1, str(tmp_path / "ledger")), tmp_path)
    monkeypatch.undo()
    head = _first(last)
    start_worker(concurrency=1)
    with pytest.raises(nbtask.NbtaskError, match="in this worker's future"):
        head.get(timeout=20)
    wait_for_housekeeping(app)
    wait_for_housekeeping(app)
    assert read_records(tmp_path / "calls") == []
    assert not errback.done()
    assert [later.state for later in _later_steps(last)] == [State.PENDING, State.PENDING]


def test_a_task_a_running_task_sends_revoked_before_it_is_sent_calls_its_errback_once(
    app: App, start_worker, tmp_path: Path
) -> None:
    """Revoked ahead (``app.control.revoke(id)`` before it is sent), a task a running task
    sends with that id (``apply_async(task_id=...)``, or a signature's ``delay()``) and a
    ``link_error`` is never queued: the worker that sends it ends it REVOKED and sends its
    errback, once, as for a chain's step revoked ahead. Before, its errback never ran."""
    step, _, note = _tasks(app)
    ledger, calls = str(tmp_path / "ledger"), str(tmp_path / "calls")
    first, second, first_errback, second_errback = (uuid.uuid4().hex for _ in range(4))

    @app.task
    def sends(path: str) -> str:
        errback = note.s(calls).set(task_id=first_errback)
        step.apply_async((1, path), task_id=first, link_error=errback)
        errback = note.s(calls).set(task_id=second_errback)
        step.s(2, path).set(task_id=second, link_error=errback).delay()
        return "sent"

    errbacks = [app.expect(task_id, note.name) for task_id in (first_errback, second_errback)]
    for task_id in (first, second):
        assert app.control.revoke(task_id) is True
    start_worker(concurrency=1)
    assert sends.delay(ledger).get(timeout=20) == "sent"
    assert [errback.get(timeout=20) for errback in errbacks] == [first, second]
    for task_id in (first, second):
        with pytest.raises(nbtask.TaskRevoked):
            app.handle(task_id).get(timeout=20)
    wait_for_housekeeping(app)
    wait_for_housekeeping(app)
    assert sorted(r["value"] for r in read_records(calls)) == sorted([first, second])
    assert read_records(ledger) == []  # neither ran
