"""Warnings of another package version on the workers: the registry is not read per cell."""

from __future__ import annotations

import time

import pytest
from raw_broker import RawBroker

from nbtask import App
from nbtask.notebook.version_warnings import VersionWarnings
from nbtask.wire.records import WorkerInfo


def test_a_worker_that_has_not_announced_its_versions_is_asked_again(
    app: App, access: RawBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = app.settings
    queue = settings.default_queue
    info = WorkerInfo("host", 1, (queue,), 1, ("c1",), seen=time.time())
    access.store.hset(f"{settings.key_prefix}:workers", "late-worker", info.to_json())
    access.store.set(f"{settings.key_prefix}:hb:late-worker", "1", ex=60)
    assert "late-worker" in app.workers()
    warnings = VersionWarnings()
    warnings.check(app, {"python"}, queue)  # nothing announced yet: nothing to compare
    assert capsys.readouterr().err == ""
    access.keys.announce_versions("late-worker", {"python": "2.7.18"})
    warnings.check(app, {"python"}, queue)
    warnings.check(app, {"python"}, queue)
    assert capsys.readouterr().err.count("but 2.7.18 on worker late-worker") == 1


def test_a_probe_that_found_no_versions_is_announced_as_none_without_an_error(
    app: App, access: RawBroker
) -> None:
    """A worker whose versions probe failed announces nothing, every tick, without raising."""
    access.keys.announce_versions("probed-worker", {"python": "3.11.7"})
    access.keys.announce_versions("probed-worker", {})
    assert access.keys.versions("probed-worker", ["python"]) == {}
