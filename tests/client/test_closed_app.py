"""A handle whose app was closed says so instead of waiting for ever.

Closing an app stops the reading of its events: a ``get()`` waiting on another thread,
or called later, would otherwise never return. The task itself runs on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from worker_process import WorkerProcess

from nbtask import App, AppClosed, Settings

pytestmark = pytest.mark.brokers


def test_a_get_waiting_when_its_app_closes_raises_app_closed_and_the_task_runs_on(
    settings: Settings, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    start_worker()
    app = App("closing", settings=settings)
    marker = tmp_path / "ran"
    handle = app.send_task("tests.sample_tasks.slow_early", (str(marker), 2.0))
    said: list[BaseException] = []

    def wait() -> None:
        try:
            handle.get()
        except BaseException as exc:  # what get() ends with is the test's subject
            said.append(exc)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    waiter.join(0.5)  # waiting now
    app.close()
    waiter.join(15)
    assert not waiter.is_alive(), "get() still waits after its app was closed"
    assert len(said) == 1 and isinstance(said[0], AppClosed), said
    assert handle.id in str(said[0]) and "handle(" in str(said[0])
    with pytest.raises(AppClosed):  # and at once, later
        handle.get()
    with pytest.raises(AppClosed):
        handle.get(timeout=30)
    # Closing the app did not stop the task: another app follows it to its end.
    follower = App("follower", settings=settings)
    try:
        assert follower.handle(handle.id).get(timeout=30) > 0
    finally:
        follower.close()
