"""A retried task's rerun on another worker, whose child is killed while it runs: the first
worker's last announcement (the registry) still names the task until its next heartbeat.
The rerun's loss is settled all the same, never taken for a copy of a running task's
message and dropped. Both brokers; the same on one worker is in ``test_faults``.

Nor is a child's loss left unsettled for good while a live worker's registry entry cannot
be read, and a loss whose task another worker announced (the dead child had not claimed
it yet) is looked at again once that worker announced anew."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

import pytest
import redis
from helpers import wait_for_housekeeping, wait_until
from raw_broker import RawBroker
from test_faults import SLOW_EARLY, _kill_the_rerun, event_types, pids_in
from worker_process import WorkerProcess

import nbtask
from nbtask import App, State
from nbtask.brokers import Delivery
from nbtask.wire.records import WorkerInfo
from nbtask.worker.lost import LostTasks

pytestmark = pytest.mark.brokers

# The first worker's heartbeat interval: its announcement naming the first run outlives
# that run by up to this (the default's second is enough, this makes it every time).
FIRST_BEAT = 2.0
# Both workers' visibility timeout: longer than three heartbeats of each, as it must be.
LEASE = 7.0
# Long enough for the rerun's loss to be looked at again past the visibility timeout.
SETTLED_WITHIN = 60.0


def _retried_on_the_second_worker(app: App, acks_late: bool) -> nbtask.Task:
    """A task whose first run waits for ``go`` and retries at once on queue ``second``,
    whose second run sleeps long (to be killed), and whose third returns its pid; each
    run appends its pid to ``ledger``."""

    @app.task(bind=True, max_retries=3, acks_late=acks_late)
    def retried_on_the_second_worker(self: nbtask.Task, ledger: str, go: str) -> int:
        with open(ledger, "a") as f:
            f.write(f"{os.getpid()}\n")
        if self.request.retries == 0:
            while not os.path.exists(go):
                time.sleep(0.01)
            raise self.retry(countdown=0, queue="second")
        with open(ledger) as f:
            runs = len(f.read().split())
        time.sleep(30.0 if runs == 2 else 0.1)
        return os.getpid()

    return retried_on_the_second_worker


def _announced(app: App, worker: WorkerProcess) -> tuple[str, ...]:
    """The tasks ``worker`` last announced its children run."""
    return next((i.busy for i in app.store.workers().values() if i.pid == worker.pid), ())


def _rerun_killed_on_the_second_worker(
    app: App,
    start_worker,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    *,
    acks_late: bool,
) -> tuple[nbtask.TaskHandle, WorkerProcess, WorkerProcess]:
    """Run the task first on one worker, then (retried) on a second, whose child is
    killed while the first worker's announcement still names the task."""
    monkeypatch.setenv("NBTASK_VISIBILITY_TIMEOUT", str(LEASE))
    monkeypatch.setenv("NBTASK_HEARTBEAT_INTERVAL", str(FIRST_BEAT))
    first = start_worker(concurrency=1)
    monkeypatch.delenv("NBTASK_HEARTBEAT_INTERVAL")
    second = start_worker("-Q", "second", concurrency=1)
    ledger, go = tmp_path / "ledger", tmp_path / "go"
    h = _retried_on_the_second_worker(app, acks_late).delay(str(ledger), str(go))
    wait_until(lambda: h.id in _announced(app, first), 30, "the first worker to announce it")
    assert pids_in(ledger)[0] in {c.pid for c in first.children()}
    go.touch()  # retried now: the first worker's next heartbeat is up to FIRST_BEAT away
    _kill_the_rerun(second, h, ledger)
    return h, first, second


def test_acks_late_rerun_on_another_worker_whose_child_is_killed_runs_again_and_finishes_once(
    app: App,
    start_worker,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    access: RawBroker,
) -> None:
    h, first, second = _rerun_killed_on_the_second_worker(
        app, start_worker, monkeypatch, tmp_path, acks_late=True
    )

    result = h.get(timeout=SETTLED_WITHIN)
    assert h.state is State.SUCCESS
    starts = pids_in(tmp_path / "ledger")
    assert len(starts) == 3, f"expected a run, its retry and one redelivery, got {starts}"
    assert result == starts[2] != starts[1]
    assert result in {c.pid for c in second.children()}
    types = event_types(access, app, h.id)
    assert types.count("retry") == 1 and types.count("success") == 1, types
    assert "worker_lost" not in types and "failure" not in types, types
    assert access.record(h.id)[b"state"] == b"SUCCESS"
    assert "dropped a copy" not in second.log.read_text()
    assert first.process.poll() is None and second.process.poll() is None
    assert access.drained()


def test_early_ack_rerun_on_another_worker_whose_child_is_killed_reports_worker_lost(
    app: App,
    start_worker,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    access: RawBroker,
) -> None:
    h, first, second = _rerun_killed_on_the_second_worker(
        app, start_worker, monkeypatch, tmp_path, acks_late=False
    )

    with pytest.raises(nbtask.WorkerLost):
        h.get(timeout=SETTLED_WITHIN)
    assert h.state is State.WORKER_LOST
    assert access.record(h.id)[b"state"] == b"WORKER_LOST"
    assert len(pids_in(tmp_path / "ledger")) == 2  # not rerun
    assert "dropped a copy" not in second.log.read_text()
    assert first.process.poll() is None and second.process.poll() is None
    assert access.drained()


def test_a_child_killed_while_a_live_workers_registry_entry_cannot_be_read_is_settled(
    app: App, start_worker, r: redis.Redis, prefix: str, tmp_path: Path, access: RawBroker
) -> None:
    """The supervisor knows its dead child ran the task (its slot named it): that is
    settled whatever a live worker may run. On RabbitMQ the copy given back is parked
    until the entry reads again (as designed); on Redis it was left with the child's
    consumer, whose lease the supervisor renews, and the task stayed STARTED for good."""
    r.hset(f"{prefix}:workers", "planted", b"\xff not json")
    r.set(f"{prefix}:hb:planted", b"1")  # no expiry: live for as long as it is there
    worker = start_worker(concurrency=1)
    marker = tmp_path / "marker"
    h = app.send_task(SLOW_EARLY, (str(marker), 30.0))
    wait_until(lambda: h.state is State.STARTED, 20, "the task to start")
    os.kill(pids_in(marker)[0], signal.SIGKILL)
    wait_until(lambda: "exit code -9" in worker.log.read_text(), 10, "the child's death seen")
    wait_for_housekeeping(app)  # its loss looked at while the entry is there
    r.delete(f"{prefix}:hb:planted")  # then reads as dead: RabbitMQ's parked copy is settled

    with pytest.raises(nbtask.WorkerLost):
        h.get(timeout=SETTLED_WITHIN)
    assert access.record(h.id)[b"state"] == b"WORKER_LOST"
    assert len(pids_in(marker)) == 1
    assert access.drained()


@pytest.mark.brokers("redis")  # RabbitMQ has no leases: its parked copies are claimed anew
def test_a_loss_seen_now_whose_task_another_worker_announced_waits_for_its_next_announcement(
    app: App, access: RawBroker, r: redis.Redis, prefix: str
) -> None:
    """A child that died before it claimed its task in its slot (the supervisor cannot
    tell it ran it): a live worker's announcement naming the task was written before the
    loss, and may name an earlier run. The delivery is held by the supervisor, unrenewed:
    the sweep of lapsed leases gives it again, and it is settled by the announcement
    then. Before, it was dropped as a copy of a running task's message."""
    access.streams.ensure_queues(["default"])  # as a worker would have
    h = app.send_task("tests.sample_tasks.add", (1, 2))
    app.flush()
    delivery = access.streams.fetch(["default"], "dead-child", 5.0)
    assert delivery is not None and delivery.task_id == h.id
    elsewhere = WorkerInfo(
        hostname="elsewhere",
        pid=1,
        queues=("default",),
        concurrency=1,
        consumers=("elsewhere-0",),
        busy=(h.id,),
        seen=time.time(),
    )
    r.hset(f"{prefix}:workers", "elsewhere", elsewhere.to_json())
    r.set(f"{prefix}:hb:elsewhere", b"1")

    def running() -> set[str] | None:  # as a supervisor reads it (no child of its own)
        live = access.keys.workers_if_known()
        return None if live is None else {t for info in live.values() for t in info.busy}

    lost = LostTasks(access.streams, app.signer, app.settings, running)
    lost.settle(delivery, "its worker process died", aside="supervisor")
    assert access.record(h.id)[b"state"] == b"STARTED"
    stream = access.streams.queue_key("default")
    holders = [p["consumer"] for p in r.xpending_range(stream, "workers", "-", "+", 10)]
    assert holders == [b"supervisor"]

    # Its next heartbeat: it runs nothing.
    r.hset(f"{prefix}:workers", "elsewhere", dataclasses.replace(elsewhere, busy=()).to_json())
    lapsed: list[Delivery] = []
    wait_until(
        lambda: bool(lapsed.extend(access.streams.stale(["default"], "supervisor")) or lapsed),
        SETTLED_WITHIN,
        "the lease to lapse",
    )
    lost.settle(lapsed[0], "its lease lapsed")
    with pytest.raises(nbtask.WorkerLost):
        h.get(timeout=SETTLED_WITHIN)
    assert access.drained()
