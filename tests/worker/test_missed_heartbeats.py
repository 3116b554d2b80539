"""A live worker that missed its heartbeats is not cleaned up after as if it were dead.

Its supervisor stopped (SIGSTOP: as a long GC pause, a stopped VM or a slow broker would)
for longer than three heartbeats, another worker takes it for dead. Before deleting its
processes' own queues and its registry entry, that one checks whether the worker's process
still runs on this host. Continued, the worker runs tasks as before.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import pytest
import redis
from helpers import wait_until
from raw_broker import RawBroker
from worker_process import WorkerProcess

from nbtask import App
from nbtask.core.holding import holder_queue
from nbtask.wire.records import WorkerInfo

pytestmark = pytest.mark.brokers

ADD = "tests.sample_tasks.add"


def _entry(r: redis.Redis, app: App, worker_id: str) -> WorkerInfo | None:
    return WorkerInfo.parse(r.hget(f"{app.settings.key_prefix}:workers", worker_id))


def _sweeps_by(r: redis.Redis, app: App, worker_id: str, count: int) -> None:
    """Until ``worker_id`` has been through ``count`` more heartbeats (its entry's time)."""

    def seen() -> float:
        entry = _entry(r, app, worker_id)
        return entry.seen if entry is not None else 0.0

    for n in range(count):
        last = seen()
        wait_until(lambda s=last: seen() > s, 10, f"heartbeat {n + 1}")


@pytest.mark.parametrize("paused", ["whole-worker", "supervisor"])
def test_worker_paused_past_its_heartbeats_keeps_its_queues_and_entry(
    app: App,
    start_worker: Callable[..., WorkerProcess],
    access: RawBroker,
    r: redis.Redis,
    paused: str,
) -> None:
    first = start_worker("-Q", "default,mine", concurrency=2)
    cleaner = start_worker(concurrency=1)
    # Read from the registry's entries, not its live workers: on a loaded host a
    # heartbeat may come late.
    names = [w.decode() for w in r.hkeys(f"{app.settings.key_prefix}:workers")]
    entries = {w: i for w in names if (i := _entry(r, app, w)) is not None}
    ids = {i.pid: w for w, i in entries.items()}
    first_id, cleaner_id = ids[first.pid], ids[cleaner.pid]
    info = entries[first_id]
    own = [holder_queue(c) for c in info.consumers]
    assert all(access.queue_exists(q) for q in own)
    stopped = [first.pid]
    if paused == "whole-worker":  # as a stopped VM: nothing of it reads
        stopped += [c.pid for c in first.children()]
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: first_id not in app.workers(), 10, "its heartbeat to lapse")
        # The cleaner claims a dead worker for two heartbeats: it looked at it by then.
        _sweeps_by(r, app, cleaner_id, 4)
        kept = _entry(r, app, first_id)
        assert kept is not None, "its registry entry was removed"
        assert kept.consumers == info.consumers
        assert [q for q in own if not access.queue_exists(q)] == [], "its queues were deleted"
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    wait_until(lambda: first_id in app.workers(), 10, "it to beat again")
    told = cleaner.log.read_text()
    assert "cleaned up after dead worker" not in told
    assert told.count(f"worker {first_id} missed its heartbeats but is alive") == 1, told
    # It runs tasks (on a queue only it serves), and its queues are still there.
    assert [app.send_task(ADD, (n, 1), queue="mine").get(timeout=15) for n in range(4)] == [
        1,
        2,
        3,
        4,
    ]
    assert all(access.queue_exists(q) for q in own)
    assert _entry(r, app, first_id) is not None
