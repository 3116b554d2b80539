"""Workers announce the Python and package versions they run."""

from __future__ import annotations

import platform
from typing import Any

import pytest
import redis
from helpers import wait_until

from nbtask import App

pytestmark = pytest.mark.brokers


def test_a_worker_announces_its_versions_and_takes_them_back_at_stop(
    app: App, start_worker: Any
) -> None:
    worker = start_worker(concurrency=1)
    worker_id = next(w for w, info in app.workers().items() if info.pid == worker.pid)

    def announced() -> dict[str, str]:
        return app.store.versions(worker_id, ["python", "redis", "no_such_package"])

    wait_until(lambda: bool(announced()), 30, "the worker's versions")
    assert announced() == {"python": platform.python_version(), "redis": redis.__version__}
    worker.stop()
    assert app.store.versions(worker_id, ["python"]) == {}
