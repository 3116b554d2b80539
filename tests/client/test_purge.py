"""Purging queues: waiting messages go, their tasks become REVOKED, running ones stay."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import client_env, wait_until
from raw_broker import RawBroker

import nbtask
from nbtask import App, Settings, State

pytestmark = pytest.mark.brokers

SLOW_EARLY = "tests.sample_tasks.slow_early"
WAIT_FOR_FILE = "tests.sample_tasks.wait_for_file"


def test_purge_revokes_waiting_tasks_and_leaves_the_running_one(
    app: App, start_worker, access: RawBroker, tmp_path: Path
) -> None:
    start_worker(concurrency=1)
    marker, go = tmp_path / "running", tmp_path / "go"
    running = app.send_task(WAIT_FOR_FILE, (str(marker), str(go)))
    wait_until(lambda: running.state is State.STARTED, 10, "the first task to start")
    ledger = tmp_path / "ran"
    waiting = [app.send_task(SLOW_EARLY, (str(ledger), 0.0)) for _ in range(3)]
    later = app.send_task(SLOW_EARLY, (str(ledger), 0.0), countdown=30)

    purged = app.purge()
    assert sorted(purged) == sorted(h.id for h in [*waiting, later])
    for handle in [*waiting, later]:
        with pytest.raises(nbtask.TaskRevoked):
            handle.get(timeout=5)
        assert access.record(handle.id)[b"state"] == b"REVOKED"
    assert app.purge() == []  # nothing left to purge

    go.touch()
    assert running.get(timeout=10) is not None
    assert running.state is State.SUCCESS
    assert app.send_task("tests.sample_tasks.add", (1, 1)).get(timeout=10) == 2
    assert not ledger.exists(), "a purged task ran"
    assert access.drained()


def test_purge_command_asks_first_then_purges(
    app: App, settings: Settings, access: RawBroker
) -> None:
    handles = [app.send_task("tests.sample_tasks.add", (i, i)) for i in range(2)]
    env = client_env(settings)
    command = [sys.executable, "-m", "nbtask", "purge", "-Q", "default"]

    declined = subprocess.run(
        command, input="n\n", env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert declined.returncode == 1
    assert "nothing purged" in declined.stderr
    assert all(access.record(h.id)[b"state"] == b"PENDING" for h in handles)

    forced = subprocess.run(
        [*command, "--force"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.strip() == "purged 2 task(s) from default"
    for handle in handles:
        with pytest.raises(nbtask.TaskRevoked):
            handle.get(timeout=5)
    assert access.drained()
