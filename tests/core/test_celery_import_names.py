"""The names a Celery import line needs, from ``nbtask``: ``shared_task``, ``states``,
``uuid``, ``TaskRevokedError``, ``TimeoutError``; and a task's ``AsyncResult``,
``subtask`` and ``__name__``."""

from __future__ import annotations

import builtins

import pytest

import nbtask
from nbtask import App, shared_task, states, uuid
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
