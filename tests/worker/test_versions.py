"""Workers announce the Python and package versions they run."""

from __future__ import annotations

import platform
from typing import Any

import pytest
import redis
from helpers import wait_until

from nbtask import App
from nbtask.notebook.version_warnings import VersionWarnings

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


def test_versions_longer_than_a_worker_announces_are_not_read(
    app: App, start_worker: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The versions hash is anyone's to write: before, 20 MB planted as a worker's Python
    version and 5 MB as a package's were read whole, and the next cell using the package
    printed all of it into its stderr as a warning."""
    worker = start_worker(concurrency=1)
    worker_id = next(w for w, info in app.workers().items() if info.pid == worker.pid)
    wait_until(lambda: bool(app.store.versions(worker_id, ["python"])), 30, "its versions")
    planted = {"python": "9.9." + "x" * 20_000_000, "redis": "0.0.1" + "y" * 5_000_000}
    app.store.link.redis.hset(f"{app.settings.key_prefix}:versions:{worker_id}", mapping=planted)
    assert app.store.versions(worker_id, ["python", "redis"]) == {}
    VersionWarnings().check(app, ["redis"], "default")
    assert len(capsys.readouterr().err) < 1000
