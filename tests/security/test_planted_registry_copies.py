"""An outsider with write access to the broker and Redis (no secret) cannot make a worker end
a live task as lost with a copy of its message. Both brokers.

A copy of a running task's genuine message made to look like a dead holder's delivery is
settled by a supervisor: dropped when a live worker's registry entry names the task, else
reported lost. Garbage kept where that live worker's entry is says nothing of what it runs:
the copy is left alone while it is there, never settled ``WORKER_LOST``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from helpers import wait_until
from raw_broker import RawBroker

from nbtask import App

pytestmark = pytest.mark.brokers

WAIT_FOR_FILE = "tests.sample_tasks.wait_for_file"


@contextmanager
def garbage_entry(r: redis.Redis, prefix: str, worker_id: bytes) -> Iterator[None]:
    """Garbage kept where a live worker's registry entry is (its heartbeats write it back)."""
    stop = threading.Event()

    def plant() -> None:
        while not stop.wait(0.01):
            r.hset(f"{prefix}:workers", worker_id, b"\xff not json")

    planter = threading.Thread(target=plant, daemon=True)
    planter.start()
    try:
        yield
    finally:
        stop.set()
        planter.join(10)


def test_a_copy_made_to_look_lost_is_not_settled_lost_while_a_live_workers_entry_is_garbage(
    app: App, access: RawBroker, r: redis.Redis, prefix: str, start_worker, tmp_path: Path
) -> None:
    marker, go = tmp_path / "marker", tmp_path / "go"
    # The task runs on a worker serving queue "a" alone; its copy is put on "default",
    # which only the second worker serves: that one's supervisor settles it.
    handle = app.send_task(WAIT_FOR_FILE, (str(marker), str(go), 120.0), queue="a")
    app.flush()
    wait_until(lambda: access.queued("a") == 1, 10, "the message on its queue")
    raw = access.peek("a")
    start_worker("-Q", "a", concurrency=1)
    wait_until(marker.exists, 30, "the task to start")
    (runner,) = r.hkeys(f"{prefix}:workers")
    settler = start_worker("-Q", "default", concurrency=1)
    words = (
        "registry entry cannot be read",  # the copy left alone
        f"dropped a copy of task {handle.id}",  # (the live entry read between two plants)
    )
    with garbage_entry(r, prefix, runner):
        access.inject_lost(raw, handle.id)
        wait_until(
            lambda: handle.done() or any(w in settler.log.read_text() for w in words),
            60,
            "the copy looked at",
        )
        assert not handle.done(), handle.error  # (before: WORKER_LOST, the task still running)
        assert "WORKER_LOST" not in settler.log.read_text()
    go.touch()
    assert handle.get(timeout=60) == int(marker.read_text().split()[0])
    # Once the entry reads again, the copy is settled as the finished task's.
    wait_until(access.drained, 30, "the copy settled")
