"""Fault tests on both brokers: workers and their children killed mid-task, tasks longer
than the visibility timeout, and warm shutdown. Each asserts the state the user sees and
that nothing is lost or run twice where it must not be."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import cloudpickle
import psutil
import pytest
from helpers import exited, wait_until
from raw_broker import RawBroker
from tcp_proxy import proxying, via
from worker_process import WorkerProcess

import nbtask
from nbtask import App, Settings, State
from nbtask.brokers import open_broker
from nbtask.core.handle import TaskHandle
from nbtask.wire.events import FINAL_SEQ, Event, EventType
from nbtask.worker.lost import LostTasks

pytestmark = pytest.mark.brokers

SLOW_MARKER = "tests.sample_tasks.slow_marker"  # acks_late
SLOW_EARLY = "tests.sample_tasks.slow_early"  # early ack
WAIT_FOR_FILE = "tests.sample_tasks.wait_for_file"
ADD = "tests.sample_tasks.add"


def pids_in(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def event_types(access: RawBroker, app: App, task_id: str) -> list[str]:
    """The types of every event sent to this client's channel about ``task_id``, in order."""
    return access.stored_event_types(app.signer, app.channel, task_id)


def test_acks_late_child_killed_is_redelivered_and_finishes_once(
    app: App, start_worker, tmp_path: Path, access: RawBroker
) -> None:
    worker = start_worker(concurrency=2)
    marker = tmp_path / "marker"
    h = app.send_task(SLOW_MARKER, (str(marker), 2.0), acks_late=True)
    # Killed mid-task: after the client has seen it start.
    wait_until(lambda: h.state is State.STARTED, 10, "the task to start")
    first = pids_in(marker)[0]
    assert first in {c.pid for c in worker.children()}
    os.kill(first, signal.SIGKILL)

    result = h.get(timeout=15)
    assert h.state is State.SUCCESS
    starts = pids_in(marker)
    assert len(starts) == 2, f"expected one start and one redelivery, got {starts}"
    assert starts[0] == first
    assert result == starts[1] != first
    assert result in {c.pid for c in worker.children()}  # the respawned/other child
    assert worker.process.poll() is None  # the supervisor survived
    types = event_types(access, app, h.id)
    assert types.count("success") == 1, types
    assert types.count("started") == 2, types
    assert "worker_lost" not in types and "failure" not in types, types
    assert access.record(h.id)[b"state"] == b"SUCCESS"
    assert access.drained()


def test_early_ack_child_killed_reports_worker_lost(
    app: App, start_worker, tmp_path: Path, access: RawBroker
) -> None:
    worker = start_worker(concurrency=2)
    marker = tmp_path / "marker"
    h = app.send_task(SLOW_EARLY, (str(marker), 30.0))
    wait_until(lambda: len(pids_in(marker)) == 1, 10, "the task to start")
    os.kill(pids_in(marker)[0], signal.SIGKILL)

    with pytest.raises(nbtask.WorkerLost) as lost:
        h.get(timeout=5)
    # Python's last line names the type once: "nbtask.errors.WorkerLost: the worker ...".
    assert str(lost.value).startswith("the worker running task ")
    assert h.state is State.WORKER_LOST
    assert access.record(h.id)[b"state"] == b"WORKER_LOST"
    # Not rerun: nothing left queued or pending, and it started only once.
    assert access.drained()
    assert len(pids_in(marker)) == 1
    # The supervisor replaced the child and keeps serving.
    assert worker.process.poll() is None
    assert app.send_task("tests.sample_tasks.add", (1, 1)).get(timeout=10) == 2
    assert len(pids_in(marker)) == 1


def _kill_the_rerun(worker: WorkerProcess, h: TaskHandle, ledger: Path) -> None:
    """Kill the child running ``h``'s second run (its pid is the ledger's second line)."""
    wait_until(lambda: len(pids_in(ledger)) == 2, 20, "the task's second run to start")
    wait_until(lambda: h.state is State.STARTED, 10, "the client to see it start again")
    rerun = pids_in(ledger)[1]
    assert rerun in {c.pid for c in worker.children()}
    os.kill(rerun, signal.SIGKILL)


def _retried_once_then_slow(app: App, acks_late: bool) -> nbtask.Task:
    """A task that retries at once on its first run, sleeps long on its second (to be
    killed), and returns its pid on a third; each run appends its pid to ``path``."""

    @app.task(bind=True, max_retries=3, acks_late=acks_late)
    def retried_once_then_slow(self: nbtask.Task, path: str) -> int:
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")
        if self.request.retries == 0:
            raise self.retry(countdown=0)
        with open(path) as f:
            runs = len(f.read().split())
        time.sleep(30.0 if runs == 2 else 0.1)
        return os.getpid()

    return retried_once_then_slow


def test_acks_late_retried_task_whose_rerun_child_is_killed_is_redelivered_and_finishes_once(
    app: App, start_worker, tmp_path: Path, access: RawBroker
) -> None:
    """A retry due at once runs in the other child while the first one, its retry stored,
    still waits for its next message. That child's slot named the task until its wait
    ended: its supervisor took the rerun's loss for a copy of a running task's message,
    dropped it, and the task stayed STARTED."""
    worker = start_worker(concurrency=2)
    ledger = tmp_path / "ledger"
    h = _retried_once_then_slow(app, acks_late=True).delay(str(ledger))
    _kill_the_rerun(worker, h, ledger)

    result = h.get(timeout=15)
    assert h.state is State.SUCCESS
    starts = pids_in(ledger)
    assert len(starts) == 3, f"expected a run, its retry and one redelivery, got {starts}"
    assert result == starts[2] != starts[1]
    assert worker.process.poll() is None
    types = event_types(access, app, h.id)
    assert types.count("retry") == 1 and types.count("success") == 1, types
    assert "worker_lost" not in types and "failure" not in types, types
    assert access.record(h.id)[b"state"] == b"SUCCESS"
    assert "dropped a copy" not in worker.log.read_text()
    assert access.drained()


def test_early_ack_retried_task_whose_rerun_child_is_killed_reports_worker_lost(
    app: App, start_worker, tmp_path: Path, access: RawBroker
) -> None:
    """The same for a task acknowledged early: its rerun is lost, and said so at once."""
    worker = start_worker(concurrency=2)
    ledger = tmp_path / "ledger"
    h = _retried_once_then_slow(app, acks_late=False).delay(str(ledger))
    _kill_the_rerun(worker, h, ledger)

    with pytest.raises(nbtask.WorkerLost):
        h.get(timeout=5)
    assert h.state is State.WORKER_LOST
    assert access.record(h.id)[b"state"] == b"WORKER_LOST"
    assert access.drained()
    assert len(pids_in(ledger)) == 2  # not rerun
    assert "dropped a copy" not in worker.log.read_text()
    assert worker.process.poll() is None


def test_acks_late_task_rejected_once_whose_rerun_child_is_killed_finishes_once(
    app: App, start_worker, tmp_path: Path, access: RawBroker
) -> None:
    """The same for a task put back by ``Reject(requeue=True)``: its copy put back runs,
    its child is killed, and it is put back again and finishes once."""
    worker = start_worker(concurrency=2)
    ledger = tmp_path / "ledger"

    @app.task(acks_late=True)
    def rejected_once_then_slow(path: str) -> int:
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")
        with open(path) as f:
            runs = len(f.read().split())
        if runs == 1:
            raise nbtask.Reject("not yet", requeue=True)
        time.sleep(30.0 if runs == 2 else 0.1)
        return os.getpid()

    h = rejected_once_then_slow.delay(str(ledger))
    _kill_the_rerun(worker, h, ledger)

    result = h.get(timeout=15)
    assert h.state is State.SUCCESS
    starts = pids_in(ledger)
    assert len(starts) == 3, f"expected a run, its copy put back and one redelivery: {starts}"
    assert result == starts[2] != starts[1]
    types = event_types(access, app, h.id)
    assert types.count("success") == 1 and "worker_lost" not in types, types
    assert access.record(h.id)[b"state"] == b"SUCCESS"
    assert access.drained()


def _kill_a_worker_running_two_tasks(
    app: App, worker: WorkerProcess, tmp_path: Path
) -> tuple[TaskHandle, TaskHandle]:
    """Start an acks_late and an early-ack task on ``worker``, then kill -9 all of it.

    They mark their runs in ``tmp_path / "late"`` and ``tmp_path / "early"``.
    """
    late_marker, early_marker = tmp_path / "late", tmp_path / "early"
    late = app.send_task(SLOW_MARKER, (str(late_marker), 1.0), acks_late=True)
    early = app.send_task(SLOW_EARLY, (str(early_marker), 30.0))
    wait_until(
        lambda: len(pids_in(late_marker)) == 1 and len(pids_in(early_marker)) == 1,
        10,
        "both tasks to start",
    )
    victims = [worker.pid] + [c.pid for c in worker.children()]
    assert set(pids_in(late_marker) + pids_in(early_marker)) <= set(victims)
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    worker.process.wait(10)
    wait_until(lambda: not any(psutil.pid_exists(p) for p in victims[1:]), 5, "children to die")
    return late, early


def test_whole_worker_killed_tasks_settled_by_another_worker(
    app: App, start_worker, tmp_path: Path, access: RawBroker
) -> None:
    late, early = _kill_a_worker_running_two_tasks(app, start_worker(concurrency=2), tmp_path)
    late_marker, early_marker = tmp_path / "late", tmp_path / "early"
    assert not late.done() and not early.done()

    second = start_worker(concurrency=2)
    # The second worker sees the first one's heartbeat lapse and settles its tasks once
    # their leases are unrenewed for the visibility timeout.
    with pytest.raises(nbtask.WorkerLost):
        early.get(timeout=app.settings.visibility_timeout + 3.0)
    assert early.state is State.WORKER_LOST

    result = late.get(timeout=15)
    assert late.state is State.SUCCESS
    starts = pids_in(late_marker)
    assert len(starts) == 2, starts
    assert result == starts[1]
    assert result in {c.pid for c in second.children()}
    assert len(pids_in(early_marker)) == 1  # early-acked: never rerun
    assert event_types(access, app, late.id).count("success") == 1
    assert access.drained()


def test_dead_workers_tasks_wait_for_a_worker_that_can_verify_them(
    app: App, start_worker, tmp_path: Path, access: RawBroker
) -> None:
    """Another app's worker on the same key prefix (another secret) is the only one alive
    when a worker dies: it cannot tell the dead worker's messages from forgeries, so it
    leaves them, and the next worker with the right secret settles them."""
    other_secret = tmp_path / "secret"
    other_secret.write_text("the-other-apps-secret")
    stranger = start_worker("--secret-file", str(other_secret), "-Q", "elsewhere", concurrency=1)
    late, early = _kill_a_worker_running_two_tasks(app, start_worker(concurrency=2), tmp_path)
    late_marker, early_marker = tmp_path / "late", tmp_path / "early"
    # Past the dead worker's heartbeats and its leases' visibility timeout, with only
    # the stranger's housekeeping running meanwhile.
    time.sleep(app.settings.visibility_timeout + 10 * app.settings.heartbeat_interval)
    # (a stranger the load slows looks at the dead worker later: waited for, not assumed)
    wait_until(
        lambda: "left dead worker" in stranger.log.read_text(),
        30,
        "the stranger to leave the dead worker to a worker with its secrets",
    )
    assert not late.done() and not early.done()
    assert access.dead_letters() == []
    told = stranger.log.read_text()
    assert "dead-lettered" not in told and told.count("left dead worker") == 1

    second = start_worker(concurrency=2)
    with pytest.raises(nbtask.WorkerLost):
        early.get(timeout=30)  # (its first heartbeats' housekeeping, slow under load)
    assert late.get(timeout=30) == pids_in(late_marker)[1]
    assert pids_in(late_marker)[1] in {c.pid for c in second.children()}
    assert len(pids_in(early_marker)) == 1
    assert access.dead_letters() == []


@pytest.mark.parametrize("task", [SLOW_EARLY, SLOW_MARKER], ids=["early_ack", "acks_late"])
def test_paused_worker_keeps_its_running_task(
    app: App, start_worker, tmp_path: Path, access: RawBroker, task: str
) -> None:
    # A supervisor that stops for longer than three heartbeats (but less than the
    # visibility timeout) looks dead to the other worker, yet its child still runs the
    # task: nothing may be taken away from it, nor reported lost.
    first = start_worker(concurrency=1)
    start_worker(concurrency=1)
    marker = tmp_path / "marker"
    h = app.send_task(task, (str(marker), 2.5))
    wait_until(lambda: len(pids_in(marker)) == 1, 10, "the task to start")
    runner = pids_in(marker)[0]
    paused = first.pid if runner in {c.pid for c in first.children()} else None
    if paused is None:  # it started on the other worker: pause that one instead
        paused = psutil.Process(runner).parent().pid
    os.kill(paused, signal.SIGSTOP)
    try:
        # Until its heartbeat lapsed (3 missed) and the other worker swept it as dead.
        wait_until(
            lambda: paused not in {i.pid for i in app.workers().values()}, 10, "it to look dead"
        )
        seen = max(i.seen for i in app.workers().values())
        wait_until(lambda: max(i.seen for i in app.workers().values()) > seen, 10, "another sweep")
    finally:
        os.kill(paused, signal.SIGCONT)
    assert h.get(timeout=20) == runner
    assert pids_in(marker) == [runner], "the task was run a second time"
    types = event_types(access, app, h.id)
    assert types.count("success") == 1 and "worker_lost" not in types, types
    assert access.drained()


@pytest.mark.brokers("redis")
def test_task_of_a_worker_paused_past_its_leases_is_lost_and_its_late_end_said(
    app: App, start_worker, tmp_path: Path
) -> None:
    # Supervisor and child stopped past the visibility timeout: the other worker reports
    # the (early-ack) task lost, without claiming its worker died. Continued, the paused
    # worker runs the task to its end; that outcome is not kept, and its log says why.
    # (On RabbitMQ a paused worker's connection holds its deliveries until the broker
    # drops it; the store's side of the late end is tested in tests/brokers.)
    first = start_worker(concurrency=1)
    second = start_worker(concurrency=1)
    marker = tmp_path / "marker"
    h = app.send_task(SLOW_EARLY, (str(marker), 2.0))
    wait_until(lambda: len(pids_in(marker)) == 1, 10, "the task to start")
    runner = pids_in(marker)[0]
    paused = first if runner in {c.pid for c in first.children()} else second
    stopped = [paused.pid, *(c.pid for c in paused.children())]
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(nbtask.WorkerLost) as lost:
            h.get(timeout=20)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    said = str(lost.value)
    # (Said by the sweep of dead workers, or of leases left unrenewed: whichever came first.)
    assert "stopped answering for " in said, said
    assert "it died, or was paused or cut off" in said and "it was not run again" in said
    assert "died (" not in said and "heartbeats" not in said, said
    late = f"task {h.id} ended (SUCCESS) after it had been reported lost"
    wait_until(lambda: late in paused.log.read_text(), 20, "the late end to be said")
    line = next(x for x in paused.log.read_text().splitlines() if late in x)
    assert "not kept (the record stays WORKER_LOST)" in line and "paused" in line, line
    assert pids_in(marker) == [runner], "the task was run a second time"
    assert app.store.get_record(h.id).state == "WORKER_LOST"


def test_task_longer_than_visibility_timeout_runs_once(
    app: App, start_worker, tmp_path: Path, access: RawBroker
) -> None:
    assert app.settings.visibility_timeout == 2.0
    start_worker(concurrency=2)
    start_worker(concurrency=2)
    marker = tmp_path / "marker"
    h = app.send_task(SLOW_MARKER, (str(marker), 5.0), acks_late=True)
    result = h.get(timeout=20)
    assert h.state is State.SUCCESS
    assert pids_in(marker) == [result], "the task was redelivered while it was running"
    types = event_types(access, app, h.id)
    assert types.count("started") == 1, types
    assert types.count("success") == 1, types
    assert access.drained()


def test_warm_shutdown_finishes_the_running_task(app: App, start_worker, tmp_path: Path) -> None:
    worker = start_worker(concurrency=2)
    marker, go = tmp_path / "marker", tmp_path / "go"
    h = app.send_task(WAIT_FOR_FILE, (str(marker), str(go)))
    wait_until(lambda: len(pids_in(marker)) == 1, 10, "the task to start")
    children = worker.children()

    busy = pids_in(marker)[0]
    assert len(children) == 2 and busy in {c.pid for c in children}

    worker.process.send_signal(signal.SIGTERM)
    # The idle child leaves (so the signal was acted on); the busy one keeps running.
    idle = next(c for c in children if c.pid != busy)
    wait_until(
        lambda: exited(idle.pid),
        10,
        "the idle child to exit",
    )
    assert psutil.Process(busy).status() != psutil.STATUS_ZOMBIE
    assert worker.process.poll() is None
    assert not h.done()
    go.touch()

    assert h.get(timeout=10) == pids_in(marker)[0]
    assert h.state is State.SUCCESS
    assert worker.process.wait(15) == 0
    worker_log = worker.log.read_text()
    assert "died" not in worker_log, worker_log
    wait_until(
        lambda: all(exited(c.pid) for c in children),
        5,
        "the child processes to exit",
    )


@pytest.mark.brokers("amqp")
def test_an_outcome_stored_but_never_sent_reaches_its_client_when_the_message_comes_back(
    app: App, start_worker, access: RawBroker
) -> None:
    """RabbitMQ: a child stores a task's outcome in Redis, then publishes its event. One
    that dies in between leaves the outcome stored and unheard of, and the message comes
    back; the worker that drops it as finished sends the stored outcome to the client."""
    h = app.send_task(ADD, (2, 3))  # no worker yet: it waits in its queue
    _store_outcome_unsent(app, access, h, 5)
    access.wait_for_channel(app.channel)  # the client listens, as one waiting would
    worker = start_worker(concurrency=1)
    assert h.get(timeout=20) == 5
    assert f"dropped a message for task {h.id}: it is already SUCCESS" in worker.log.read_text()


@pytest.mark.brokers("amqp")
def test_an_outcome_stored_but_never_sent_reaches_its_client_when_its_supervisor_settles_it(
    app: App, access: RawBroker
) -> None:
    """The same, the child's supervisor settling the delivery it held (the task finished:
    only the acknowledgement, and the event, were lost)."""
    transport = open_broker(app.settings, app.settings.broker_url or "")
    try:
        transport.ensure_queues(["default"])
        h = app.send_task(ADD, (2, 3))
        delivery = transport.fetch(["default"], "test-consumer", 10)
        assert delivery is not None
        _store_outcome_unsent(app, access, h, 5)
        access.wait_for_channel(app.channel)
        LostTasks(transport, app.signer, app.settings).settle(delivery, "child died")
        assert h.get(timeout=20) == 5
    finally:
        transport.close()


def _store_outcome_unsent(app: App, access: RawBroker, handle: TaskHandle, value: int) -> None:
    """What a child that died after storing a task's outcome left: the record, no event."""
    task_id, run = handle.id, (app.settings.key_prefix, handle.sent)
    data = {"serializer": "cloudpickle"}
    event = Event(EventType.SUCCESS, task_id, FINAL_SEQ - 1, data, run=run)
    outcome = app.signer.seal(event.to_header(), cloudpickle.dumps(value, protocol=5))
    access.store.hset(
        access.keys.record_key(task_id),
        mapping={"state": "SUCCESS", "client": app.channel, "result": outcome},
    )


@pytest.mark.brokers("amqp")
def test_one_sigterm_stops_a_worker_whose_broker_stopped_answering(
    start_worker, settings: Settings
) -> None:
    """RabbitMQ, behind a proxy that stops passing on what it says, answers nothing: a
    stopping child waits a little for its close to be confirmed, then drops its
    connection, and the supervisor gives up the same way on the answers it waits for."""
    with proxying(settings.broker_url or "", 5672) as proxy:
        worker = start_worker("-b", via(settings.broker_url or "", proxy.url_port), concurrency=2)
        proxy.deafen()  # the broker still hears, but nothing it says comes back
        worker.stops_on_one_sigterm()
