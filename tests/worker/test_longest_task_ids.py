"""A task whose custom id is as long as a task id may be (``MAX_TASK_ID_CHARS``, 64): the
worker's supervisor knows it by its whole id, as any other. Before, a worker child's slot
kept only its first 63 characters, which named no task: the supervisor never found that
task to terminate it, took a kill past its hard time limit for a loss (the task ran again),
and its worker listed it running under a cut id. Both brokers."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from helpers import wait_for_housekeeping, wait_until

import nbtask
from nbtask import App, State
from nbtask.core.options import MAX_TASK_ID_CHARS, check_task_id
from nbtask.worker.slots import SlotState
from tests.celery_tasks import read_records

pytestmark = pytest.mark.brokers

WAIT_FOR_FILE = "tests.sample_tasks.wait_for_file"


def _longest_id(tag: str) -> str:
    return (tag + "-" + "x" * MAX_TASK_ID_CHARS)[:MAX_TASK_ID_CHARS]


def test_a_running_task_with_the_longest_id_is_listed_by_its_whole_id(
    app: App, start_worker, tmp_path: Path
) -> None:
    start_worker(concurrency=1)
    marker, go = tmp_path / "marker", tmp_path / "go"
    h = app.send_task(WAIT_FOR_FILE, (str(marker), str(go)), task_id=_longest_id("listed"))
    assert len(h.id) == MAX_TASK_ID_CHARS

    def listed() -> bool:
        return any(h.id in info.busy for info in app.workers().values())

    wait_until(listed, 15, "the worker to list the task running by its id")
    go.touch()
    assert h.get(timeout=15) == int(marker.read_text())


def test_a_task_with_the_longest_id_is_terminated_by_its_id(
    app: App, start_worker, tmp_path: Path
) -> None:
    start_worker(concurrency=1)
    ledger = tmp_path / "ledger"

    @app.task
    def stubborn(path: str) -> None:
        import time as t

        from tests.celery_tasks import record

        record(path, h="started")
        while True:  # ends only when its process is killed
            with contextlib.suppress(KeyboardInterrupt):
                t.sleep(30)

    h = stubborn.apply_async((str(ledger),), task_id=_longest_id("terminated"))
    wait_until(lambda: len(read_records(ledger)) == 1, 15, "the task to start")
    assert app.revoke(h.id, terminate=True, grace=0.5) is True
    with pytest.raises(nbtask.TaskRevoked):
        h.get(timeout=20)
    assert h.state is State.REVOKED


def test_a_task_with_the_longest_id_killed_past_its_time_limit_fails_once(
    app: App, start_worker, tmp_path: Path
) -> None:
    start_worker(concurrency=1)
    ledger = tmp_path / "ledger"

    @app.task(time_limit=1, acks_late=True)
    def stuck(path: str) -> None:
        import time as t

        from tests.celery_tasks import record

        record(path, h="started")
        while True:  # ignores everything but SIGKILL
            with contextlib.suppress(BaseException):
                t.sleep(30)

    h = stuck.apply_async((str(ledger),), task_id=_longest_id("time-limited"))
    with pytest.raises(nbtask.RemoteError) as info:
        h.get(timeout=30)
    assert info.value.ename == "TimeLimitExceeded"
    # A kill past the time limit is an outcome, not a loss: the task is not run again.
    wait_for_housekeeping(app)
    assert len(read_records(ledger)) == 1
    assert h.state is State.FAILURE


@pytest.mark.parametrize("planted", ["a" * MAX_TASK_ID_CHARS + "b", "a" * 10 + "\0b"])
def test_a_slot_names_no_task_for_an_id_it_cannot_keep_whole(planted: str) -> None:
    """Only a queue entry not written by nbtask names such an id beside its message (the
    child shows it in its slot before the message is checked). Cut plainly, it read as
    another task's id: the supervisor would terminate this child in that task's stead, or
    fail that task for a time limit this one passed."""
    slot = SlotState()
    whole = _longest_id("whole")
    slot.occupy(whole, 0.0)
    assert slot.task_id == whole
    slot.occupy(planted, 0.0)
    kept = slot.task_id
    assert kept and kept not in (planted, planted[:10], planted[:MAX_TASK_ID_CHARS])
    with pytest.raises(nbtask.ConfigurationError):
        check_task_id(kept)  # the id of no task
