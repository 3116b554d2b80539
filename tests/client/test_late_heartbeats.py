"""A worker whose heartbeats are late is not said gone while it may be paused.

A loaded host or a long collection can hold a worker's supervisor past its heartbeats, so
the registry no longer names it live for a moment. A handle then asks why its task waits:
while the worker's process still runs on this host, nothing is said of a worker gone
(a notebook's progress line would say "no live worker consumes queue 'default'" of a
worker about to take the task); one whose process is stopped is said to be, with how to
continue it.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest
from helpers import wait_until

from nbtask import App, State
from nbtask._process import start_ticks

pytestmark = pytest.mark.brokers

ADD = "tests.sample_tasks.add"
WAIT_FOR_FILE = "tests.sample_tasks.wait_for_file"


def test_a_worker_paused_past_its_heartbeats_is_not_said_gone(
    app: App, start_worker, tmp_path: Path
) -> None:
    """Its supervisor stopped (SIGSTOP) until the registry no longer names it live: the
    task its process runs and the one queued behind it say the worker is stopped and how
    to continue it, not that it is gone. They said "its worker ... stopped sending
    heartbeats" and "no live worker consumes queue 'default'"."""
    worker = start_worker(concurrency=1)
    worker_id, entry = worker.entry()
    assert entry.start_ticks == start_ticks(worker.pid)  # (its process told by it)
    marker, go = tmp_path / "marker", tmp_path / "go"
    running = app.send_task(WAIT_FOR_FILE, (str(marker), str(go), 60.0))
    wait_until(lambda: running.state is State.STARTED, 20, "the task to start")
    queued = app.send_task(ADD, (1, 2))
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        # Read anew here: the handles below go by this read of the registry.
        wait_until(lambda: worker_id not in app.workers(), 10, "its heartbeat to lapse")
        assert queued.state is State.PENDING and running.state is State.STARTED
        stopped = (
            f"its worker (host {socket.gethostname()}, pid {worker.pid}) is stopped (SIGSTOP, "
            f"or Ctrl-Z in its terminal): it goes on once continued (kill -CONT {worker.pid}, "
            "or fg there)"
        )
        assert (running.waiting_reason, queued.waiting_reason) == (stopped, stopped)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    go.touch()
    assert running.get(timeout=20) == int(marker.read_text())
    assert queued.get(timeout=20) == 3
