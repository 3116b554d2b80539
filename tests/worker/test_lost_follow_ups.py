"""What follows a task its worker settles on its behalf, on both brokers: a child killed
under an early-ack task (WORKER_LOST), one killed past its hard time limit, and an
acks_late task dead-lettered. Its chain's later steps fail with it (their handles end,
never PENDING for ever), its errbacks run once, its callbacks never."""

from __future__ import annotations

import os
import signal
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import remote_of, wait_for_housekeeping, wait_until

import nbtask
from nbtask import App, State
from tests.celery_tasks import read_records

pytestmark = pytest.mark.brokers


@dataclass
class Noted:
    """A test's tasks on ``app`` and the files they note in: a step that notes its run in
    ``ledger`` and sleeps, the same with a hard time limit, and a note of its calls in
    ``calls``."""

    app: App
    step: Any
    stuck: Any
    note: Any
    ledger: Path
    calls: Path

    def follow_ups(self) -> tuple[dict[str, Any], Any]:
        """``link`` and ``link_error`` options that note their calls in ``calls``, and
        the handle of the errback's run."""
        errback_id = uuid.uuid4().hex
        options = {
            "link": self.note.s(str(self.calls)),
            "link_error": self.note.s(str(self.calls)).set(task_id=errback_id),
        }
        return options, self.app.expect(errback_id, self.note.name)

    def called_once_for(self, errback: Any, task_id: str) -> None:
        """The errback ran for ``task_id``, and once only: nothing else noted a call
        once the workers are done with the task's follow-ups."""
        assert errback.get(timeout=20) == task_id
        wait_for_housekeeping(self.app)
        wait_for_housekeeping(self.app)
        assert [r["value"] for r in read_records(self.calls)] == [task_id]


@pytest.fixture
def noted(app: App, tmp_path: Path) -> Noted:
    """The tasks the tests send, defined on ``app``."""

    @app.task
    def step(x: int, path: str, seconds: float) -> int:
        import time

        from tests.celery_tasks import record

        record(path, step=x)
        time.sleep(seconds)
        return x + 1

    @app.task(time_limit=1)
    def stuck(x: int, path: str, seconds: float) -> int:
        import time

        from tests.celery_tasks import record

        record(path, step=x)
        time.sleep(seconds)
        return x + 1

    @app.task
    def note(value: object, path: str) -> object:
        from tests.celery_tasks import record

        record(path, value=value)
        return value

    return Noted(app, step, stuck, note, tmp_path / "ledger", tmp_path / "calls")


def _kill_the_run_of(path: Path, step: int) -> None:
    """SIGKILL the process that noted running ``step`` in ``path``, once it has."""
    wait_until(lambda: any(r.get("step") == step for r in read_records(path)), 20, f"step {step}")
    pid = next(r["pid"] for r in read_records(path) if r.get("step") == step)
    os.kill(pid, signal.SIGKILL)


def test_chain_with_a_killed_middle_step_fails_its_later_steps(
    app: App, start_worker, noted: Noted
) -> None:
    start_worker(concurrency=2)
    step, ledger = noted.step, str(noted.ledger)
    last = (step.s(1, ledger, 0) | step.s(ledger, 60) | step.s(ledger, 0)).delay()
    _kill_the_run_of(noted.ledger, 2)
    with pytest.raises(nbtask.WorkerLost) as info:
        last.get(timeout=30)
    assert "an earlier task in its chain" in str(info.value)
    middle = last.parent
    assert middle is not None
    assert middle.id in str(info.value)
    assert last.state is State.WORKER_LOST
    with pytest.raises(nbtask.WorkerLost):
        middle.get(timeout=10)
    assert app.store.get_record(last.id).state == "WORKER_LOST"
    wait_for_housekeeping(app)
    assert [r["step"] for r in read_records(noted.ledger)] == [1, 2]  # the last step never ran


def test_chain_with_a_time_limited_middle_step_fails_its_later_steps(
    app: App, start_worker, noted: Noted
) -> None:
    start_worker(concurrency=2)
    step, ledger = noted.step, str(noted.ledger)
    last = (step.s(1, ledger, 0) | noted.stuck.s(ledger, 60) | step.s(ledger, 0)).delay()
    with pytest.raises(nbtask.RemoteError) as info:
        last.get(timeout=40)
    assert remote_of(info.value).ename == "TimeLimitExceeded"
    assert last.state is State.FAILURE
    middle = last.parent
    assert middle is not None
    with pytest.raises(nbtask.RemoteError) as middle_info:
        middle.get(timeout=10)
    assert remote_of(middle_info.value).ename == "TimeLimitExceeded"
    wait_for_housekeeping(app)
    assert [r["step"] for r in read_records(noted.ledger)] == [1, 2]


def test_chain_with_a_step_killed_after_its_cancel_grace_fails_its_later_steps(
    app: App, start_worker, noted: Noted
) -> None:
    start_worker(concurrency=2)

    @app.task
    def stubborn(x: int, path: str) -> int:
        import time

        from tests.celery_tasks import record

        record(path, step=x)
        while True:  # a cancel's interrupt is ignored: it takes the SIGKILL after the grace
            try:
                time.sleep(30)
            except KeyboardInterrupt:
                record(path, ignored=x)

    options, errback = noted.follow_ups()
    step, ledger = noted.step, str(noted.ledger)
    first_sig = stubborn.s(1, ledger).set(link_error=options["link_error"])
    last = (first_sig | step.s(ledger, 0) | step.s(ledger, 0)).delay()
    first = last.parent.parent
    wait_until(lambda: first.state is State.STARTED, 20, "the first step to start")
    wait_until(lambda: len(read_records(noted.ledger)) == 1, 20, "the first step to run")
    assert app.revoke(first.id, terminate=True, grace=0.5) is True
    with pytest.raises(nbtask.TaskRevoked) as info:
        last.get(timeout=30)
    assert first.id in str(info.value)
    assert last.state is State.REVOKED
    noted.called_once_for(errback, first.id)
    assert [r["step"] for r in read_records(noted.ledger) if "step" in r] == [1]


def test_link_error_is_called_once_for_a_time_limit_kill(
    app: App, start_worker, noted: Noted
) -> None:
    start_worker(concurrency=2)
    options, errback = noted.follow_ups()
    h = noted.stuck.apply_async((1, str(noted.ledger), 60), **options)
    with pytest.raises(nbtask.RemoteError):
        h.get(timeout=30)
    noted.called_once_for(errback, h.id)  # once; the link never


def test_link_error_is_called_once_for_a_worker_lost(app: App, start_worker, noted: Noted) -> None:
    start_worker(concurrency=2)
    options, errback = noted.follow_ups()
    h = noted.step.apply_async((1, str(noted.ledger), 60), **options)
    _kill_the_run_of(noted.ledger, 1)
    with pytest.raises(nbtask.WorkerLost):
        h.get(timeout=30)
    noted.called_once_for(errback, h.id)


def test_link_error_is_called_once_for_a_dead_lettered_task_and_never_on_a_redelivery(
    app: App, start_worker, noted: Noted, tmp_path: Path
) -> None:
    start_worker(concurrency=1)
    starts = tmp_path / "starts"
    options, errback = noted.follow_ups()
    h = app.send_task("tests.sample_tasks.poison", (str(starts),), acks_late=True, **options)
    with pytest.raises(nbtask.RemoteError) as info:
        h.get(timeout=60)
    assert "dead-letter" in remote_of(info.value).evalue
    noted.called_once_for(errback, h.id)
    assert len(starts.read_text().split()) == 1 + app.settings.max_redeliveries
