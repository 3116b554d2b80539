"""Work waiting on one worker process's own queue (where a kept value is held) is moved to
the queue it falls back to once that process is gone (see ``LostTasks.rehome``), and work
parked for it until its due time is parked for that queue: from then on its record,
``nbtask inspect``, its handle and a handle re-attached by id name that queue, and its
handle says why it waits there (a retry waiting there too: see ``test_holder_lost``). A
retry's move to a queue it names is in ``test_retry_queue``."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import cast

import pytest
from helpers import RECORD_ID, ROOT, broker_env, client_env, wait_until
from raw_broker import RawBroker

from nbtask import App, Settings, State
from nbtask.brokers import Store
from nbtask.client.live_workers import REFRESH_SECONDS, LiveWorkers
from nbtask.core.handle import Client, StartedBy, TaskHandle
from nbtask.core.holding import holder_queue
from nbtask.wire.records import TaskRecord, WorkerInfo


def _inspect(settings: Settings, task_id: str) -> dict[str, str]:
    """The ``name: value`` lines ``nbtask inspect TASK_ID`` prints for the test's broker."""
    env = {**client_env(settings), **broker_env(settings), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "nbtask", "inspect", task_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())


@pytest.mark.brokers()
def test_a_task_moved_off_a_gone_process_queue_is_on_its_fallback_queue_everywhere(
    app: App, settings: Settings, access: RawBroker, start_worker, tmp_path: Path
) -> None:
    """Sent to process ghost-0's own queue, ghost-0 gone: a worker of queue 'other' moves
    it to 'default' (where it falls back), which no worker serves yet. Its record,
    ``nbtask inspect``, its handle and a handle re-attached by id say 'default', and the
    handle waits saying no live worker consumes 'default'. All of them named ghost-0's
    queue, and the handle said no live worker consumes it."""
    ledger = tmp_path / "ledger"
    own = holder_queue("ghost-0")
    h = app.send_task(RECORD_ID, (str(ledger),), queue=own)
    app.flush()
    wait_until(lambda: access.waiting(own), 5, "the message on its queue")
    access.forge_dead_process("ghost-0")
    cleaner = start_worker("-Q", "other", concurrency=1)  # not of 'default'
    said = "moved 1 task(s) waiting for process ghost-0 elsewhere"
    wait_until(lambda: said in cleaner.log.read_text(), 20, "the move off ghost-0's queue")

    record = app.store.get_record(h.id)
    assert record is not None and record.state is State.PENDING
    assert record.queue == "default"
    assert _inspect(settings, h.id).get("queue") == "default"
    # A handle follows it once something asks why it waits (a view does, every second).
    assert h.waiting_reason == "no live worker consumes queue 'default'"
    assert h.queue == "default"
    other = App("other", settings=settings)
    try:
        assert other.handle(h.id).queue == "default"
    finally:
        other.close()

    start_worker(concurrency=1)
    assert h.get(timeout=20) == h.id
    assert ledger.read_text().split() == [h.id]
    assert _inspect(settings, h.id).get("queue") == "default"


@pytest.mark.brokers()
def test_a_task_parked_for_a_gone_process_queue_runs_on_its_fallback_queue_when_due(
    app: App, access: RawBroker, start_worker, tmp_path: Path
) -> None:
    """Sent to process ghost-0's own queue with a countdown (as a retry with one is parked
    there), ghost-0 gone: a worker of queue 'other' parks it for 'default', due as it was,
    its record and handle naming 'default'; once a worker of 'default' starts, it runs
    there, once. Before, it stayed parked for ghost-0's queue for good (only ghost-0's own
    supervisor moves what is due there), and its handle said no live worker consumes it."""
    ledger = tmp_path / "ledger"
    own = holder_queue("ghost-0")
    h = app.send_task(RECORD_ID, (str(ledger),), queue=own, countdown=3)
    app.flush()
    [(_, due)] = access.store.zrange(access.keys.eta_key(own), 0, -1, withscores=True)
    access.forge_dead_process("ghost-0")
    cleaner = start_worker("-Q", "other", concurrency=1)  # not of 'default'
    said = "moved 1 task(s) waiting for process ghost-0 elsewhere"
    wait_until(lambda: said in cleaner.log.read_text(), 20, "the move off ghost-0's queue")

    assert not access.store.exists(access.keys.eta_key(own))
    fallback = access.keys.eta_key("default")
    [(member, moved_due)] = access.store.zrange(fallback, 0, -1, withscores=True)
    assert member.startswith(f"{h.id}:".encode())
    assert moved_due == due
    record = app.store.get_record(h.id)
    assert record is not None and record.state is State.PENDING
    assert record.queue == "default"
    assert h.waiting_reason == "no live worker consumes queue 'default'"
    assert h.queue == "default"

    start_worker(concurrency=1)
    assert h.get(timeout=20) == h.id
    assert ledger.read_text().split() == [h.id]


class _Moved:
    """A client that says a task was moved to 'default', and records what a handle asks."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, StartedBy | None]] = []
        self.moves: list[tuple[str, str]] = []

    def waiting_reason(self, queue: str, started_by: StartedBy | None = None) -> str:
        self.asked.append((queue, started_by))
        return "asked"

    def moved_to(self, task_id: str, queue: str) -> str | None:
        self.moves.append((task_id, queue))
        return "default"


def test_a_handle_on_a_process_queue_asks_where_its_task_was_moved_and_follows_it() -> None:
    """Client side alone: a handle on a process's own queue asks whether its task was
    moved before it asks why it waits, takes the queue it was moved to, and asks about
    that queue; one on any other queue never asks (no read for the usual case)."""
    moved = _Moved()
    own = holder_queue("w1-0")
    handle = TaskHandle(cast(Client, moved), "t1", "cell", own)
    assert handle.waiting_reason == "asked"
    assert (handle.queue, moved.moves, moved.asked) == (
        "default",
        [("t1", own)],
        [("default", None)],
    )
    assert handle.waiting_reason == "asked"
    assert len(moved.moves) == 1  # on 'default' now: never moved without an event

    usual = TaskHandle(cast(Client, moved), "t2", "task", "gpu")
    assert usual.waiting_reason == "asked"
    assert (usual.queue, len(moved.moves)) == ("gpu", 1)


def test_only_a_waiting_record_is_named_where_its_message_moved(
    app: App, access: RawBroker
) -> None:
    """The worker moving a message names its queue in a record whose message waits
    unstarted alone: PENDING, or RETRY (a retry waiting to run again; before, only a
    PENDING one was named). None is made where there is none (it would have no expiry),
    and one that started is left."""
    h = app.send_task(RECORD_ID, ("unused",), queue="gpu")  # nobody serves gpu
    app.flush()
    assert app.store.note_moved(h.id, "default")
    assert access.record(h.id)[b"queue"] == b"default"
    assert not app.store.note_moved("no-such-task", "default")
    assert access.record("no-such-task") == {}
    record = access.keys.record_key(h.id)
    access.store.hset(record, "state", "RETRY")
    assert app.store.note_moved(h.id, "other")
    assert access.record(h.id)[b"queue"] == b"other"
    access.store.hset(record, "state", "STARTED")
    assert not app.store.note_moved(h.id, "elsewhere")
    assert access.record(h.id)[b"queue"] == b"other"


class _Registry:
    """A store whose registry names one process's own queue, or none: it counts reads."""

    def __init__(self, queue: str) -> None:
        self.queues: tuple[str, ...] = (queue,)
        self.records = 0

    def workers(self) -> dict[str, WorkerInfo]:
        return {"w1": WorkerInfo("host", 10, self.queues, 1, ("w1-0",), pids=(11,))}

    def get_record(self, task_id: str) -> TaskRecord:
        self.records += 1
        return TaskRecord(State.PENDING, queue="default")


def test_where_a_task_moved_is_read_only_off_a_gone_process_queue_once_per_refresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing is read for a task on a queue that is not one process's own, nor while
    the process whose queue it is lives; once it is gone, the task's record is read once,
    and again once the answer is older than the registry's snapshot may be."""
    own = holder_queue("w1-0")
    store = _Registry(own)
    live = LiveWorkers(cast(Store, store), "key")
    assert live.moved_to("t1", "gpu") is None
    assert live.moved_to("t1", own) is None  # its process lives
    assert store.records == 0
    store.queues = ()
    live.read()  # (the registry as read now: the process is gone)
    assert [live.moved_to("t1", own) for _ in range(5)] == ["default"] * 5
    assert store.records == 1
    later = time.monotonic() + REFRESH_SECONDS + 1.0
    monkeypatch.setattr(time, "monotonic", lambda: later)  # the clock live_workers reads
    assert live.moved_to("t1", own) == "default"
    assert store.records == 2


def test_a_forged_queue_in_the_record_is_not_taken_for_where_the_task_moved(
    app: App, access: RawBroker
) -> None:
    """Someone with write access to Redis, not the secret, names another queue in the
    record of a task waiting on a gone process's own queue. A move sends it only to the
    fallback queue its signed message names ('default'): the handle does not take the
    forged one, so it never says (nor, under ``nbtask run``, cancels its cell because) no
    live worker consumes a queue the task is not on, nor prints its control codes. Before,
    the handle took any queue the record named."""
    own = holder_queue("ghost-0")
    h = app.send_task(RECORD_ID, ("unused",), queue=own)
    app.flush()
    # Forged once the client's own write landed (a lone send's is not waited for).
    wait_until(lambda: access.record(h.id).get(b"queue") == own.encode(), 5, "its record")
    forged = "nowhere\x1b[2J"
    access.store.hset(access.keys.record_key(h.id), "queue", forged)
    reason = h.waiting_reason
    assert h.queue == own
    assert reason is None or "nowhere" not in reason
    # The queue its signed message falls back to is still followed.
    access.store.hset(access.keys.record_key(h.id), "queue", "default")
    time.sleep(REFRESH_SECONDS + 0.5)  # (the last answer is kept that long: read again)
    assert h.waiting_reason == "no live worker consumes queue 'default'"
    assert h.queue == "default"
