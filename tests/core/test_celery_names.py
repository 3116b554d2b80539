"""Celery's ``AsyncResult`` and app names: aliases with Celery's meanings, or one error
saying what nbtask offers instead."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from helpers import wait_until

import nbtask
from nbtask import App, State

pytestmark = pytest.mark.brokers

EXPLODE = "tests.sample_tasks.explode"
WAIT_FOR_FILE = "tests.sample_tasks.wait_for_file"


def test_a_handle_answers_to_celerys_result_names(app: App, start_worker) -> None:
    start_worker()

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    h = add.delay(2, 3)
    assert h.wait(timeout=10) == 5
    assert h.status == "SUCCESS" and type(h.status) is str
    assert h.task_id == h.id
    assert h.traceback is None
    assert h.result() == 5  # a method: it is concurrent.futures.Future.result
    assert h.info != 5 and "worker" in h.info  # who ran it, not the return value (Celery's)
    again = app.AsyncResult(h.id)  # app.handle(id): from the store once the task ended
    assert (again.task_id, again.get(timeout=10), again.status) == (h.id, 5, "SUCCESS")
    with pytest.raises(nbtask.TaskNotFound):  # Celery's would read PENDING forever
        app.AsyncResult(uuid.uuid4().hex)

    failed = app.send_task(EXPLODE, ("broken on purpose",))
    with pytest.raises(ValueError, match="broken on purpose"):
        failed.wait(timeout=10)
    assert isinstance(failed.wait(10, False), ValueError)  # Celery's wait(timeout, propagate)
    assert failed.status == "FAILURE"
    text = failed.traceback
    assert text is not None and "_explode_helper" in text and "broken on purpose" in text


def test_revoke_on_a_handle_and_app_control_revoke_are_app_revoke(
    app: App, start_worker, tmp_path: Path
) -> None:
    queued = [app.send_task(WAIT_FOR_FILE, ("-", "-")) for _ in range(4)]
    assert queued[0].revoke() is True
    assert app.control.revoke(queued[1].id) is True
    assert app.control.revoke([queued[2].id, queued[3].id]) is True
    for h in queued:
        with pytest.raises(nbtask.TaskRevoked):
            h.get(timeout=5)
        assert h.status == "REVOKED"

    start_worker(concurrency=1)
    marker, go = tmp_path / "marker", tmp_path / "go"
    running = app.send_task(WAIT_FOR_FILE, (str(marker), str(go)))
    wait_until(marker.exists, 10, "the task to start")
    # Without terminate, as in Celery, a running task runs on.
    assert running.revoke() is False
    assert app.control.revoke(running.id) is False
    go.touch()
    assert isinstance(running.get(timeout=10), int)

    marker.unlink()
    go.unlink()
    stopped = app.send_task(WAIT_FOR_FILE, (str(marker), str(go), 30.0))
    wait_until(marker.exists, 10, "the task to start")
    wait_until(lambda: stopped.state is State.STARTED, 10, "the task to show as started")
    assert stopped.revoke(terminate=True, grace=1.0) is True
    with pytest.raises(nbtask.TaskRevoked):
        stopped.get(timeout=10)
    assert stopped.revoke() is False  # ended: nothing to revoke


@pytest.mark.brokers("redis")
def test_celerys_names_nbtask_has_no_counterpart_for_say_what_to_do_instead(app: App) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    h = add.delay(1, 2)
    expected = {
        "forget": r"forget\(\) is Celery's; .*result_ttl",
        "children": r"children is Celery's; .*app\.handle\(id\)",
    }
    for name, message in expected.items():
        with pytest.raises(AttributeError, match=message):
            getattr(h, name)
        assert not hasattr(h, name)
    with pytest.raises(AttributeError, match=r"App\(\.\.\.\) keyword arguments or NBTASK_\*"):
        app.conf  # noqa: B018
    assert not hasattr(app, "conf")
    with pytest.raises(AttributeError, match=r"has only revoke\(\).*app\.workers\(\)"):
        app.control.inspect()
