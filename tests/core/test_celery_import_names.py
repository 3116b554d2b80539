"""The names a Celery import line needs, from ``nbtask``: ``shared_task``, ``states``,
``uuid``, ``TaskRevokedError``, ``TimeoutError``; and a task's ``AsyncResult``,
``subtask`` and ``__name__``."""

from __future__ import annotations

import builtins

import pytest

import nbtask
from nbtask import App, ConfigurationError, current_app, current_task, shared_task, states, uuid
from nbtask.client import default

pytestmark = pytest.mark.brokers


def test_celerys_import_line_names_work_on_the_default_app(
    app: App, start_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    start_worker()
    monkeypatch.setattr(default, "_default", app)  # the default app, as in a notebook

    @shared_task
    def add(x: int, y: int) -> int:
        return x + y

    @shared_task(bind=True, name="tests.shared.double")
    def double(self, x: int) -> tuple[str, int]:
        return self.request.id, 2 * x

    assert add.app is app and app.tasks["tests.shared.double"] is double
    assert add.__name__ == "add" and double.__name__ == "double"
    task_id = uuid()
    assert len(task_id) == 32
    h = add.apply_async((2, 3), task_id=task_id)
    assert h.get(timeout=15) == 5 and h.id == task_id
    assert h.state == states.SUCCESS == "SUCCESS"
    assert h.state in states.READY_STATES and h.state not in states.UNREADY_STATES
    assert add.AsyncResult(task_id).get(timeout=15) == 5
    assert add.subtask((1,), {"y": 1}).delay().get(timeout=15) == 2
    sent = double.delay(4)
    assert sent.get(timeout=15) == (sent.id, 8)

    later = add.apply_async((1, 1), countdown=60)
    assert later.state == states.PENDING
    with pytest.raises(nbtask.TimeoutError):
        later.get(timeout=0.2)
    assert nbtask.TimeoutError is builtins.TimeoutError
    later.revoke()
    with pytest.raises(nbtask.TaskRevokedError):
        later.get(timeout=15)
    assert later.state == states.REVOKED and states.REVOKED in states.PROPAGATE_STATES


def test_current_task_and_current_app_are_the_running_task_and_its_app(
    app: App, start_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    start_worker("-A", "tests.celery_tasks")
    h = app.send_task("tests.celery_tasks.who_runs")
    assert h.get(timeout=15) == {
        "task_is_self": True,
        "id": h.id,
        "name": "tests.celery_tasks.who_runs",
        "app_is_own": True,
        "app_has_it": True,
    }

    @app.task
    def shipped() -> tuple[str, str, bool, str]:
        said = "its own app"
        try:
            current_app.tasks  # noqa: B018 - shipped by value: no app travels with it
        except ConfigurationError as exc:
            said = str(exc)
        return current_task.request.id, current_task.name, bool(current_task), said

    sent = shipped.delay()
    task_id, name, truthy, said = sent.get(timeout=15)
    assert (task_id, name, truthy) == (sent.id, shipped.name, True)
    assert "shipped to this worker without its app" in said

    # Here, in the client: no task runs; the app is the default one.
    monkeypatch.setattr(default, "_default", app)
    assert not current_task and current_task == None  # noqa: E711 - a proxy of None
    with pytest.raises(AttributeError, match="no task is running in this thread"):
        current_task.request  # noqa: B018
    assert current_app._get_current_object() is app and current_app.tasks is app.tasks
    ran = shipped.apply()  # in this process: the task's own app
    assert ran.get() == (ran.id, shipped.name, True, "its own app")
