"""Replays of genuine messages, by someone with broker access but not the secret: a task
that ended never runs again, whatever was done to its plain bookkeeping, and a message
runs only in the app and queue it was sent to, and a copy of a running task's message
never ends it. Both brokers (a broker's own bookkeeping, on that broker alone)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import RECORD_ID, wait_for_housekeeping, wait_until
from raw_broker import RawBroker, raw_broker

import nbtask
from nbtask import App, Settings
from nbtask.brokers.scripts import EXPIRY_UPKEEP_SECONDS
from nbtask.core.holding import holder_queue
from nbtask.wire.records import WorkerInfo

pytestmark = pytest.mark.brokers

ADD = "tests.sample_tasks.add"


def runs_in(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _log_count(worker: object, text: str) -> int:
    return str(worker.log.read_text()).count(text)  # type: ignore[attr-defined]


def _sent_then_run(app: App, access: RawBroker, start_worker, ledger: Path, **options):
    """Send a task with no worker up, keep its message as sent, then run it."""
    h = app.send_task(RECORD_ID, (str(ledger),), **options)
    wait_until(access.waiting, 5, "the message on its queue")
    raw = access.peek()
    worker = start_worker(concurrency=1)
    assert h.get(timeout=15) == h.id
    return h, raw, worker


def test_replay_of_a_backend_none_task_never_runs_it_again(
    app: App, access: RawBroker, start_worker, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"

    @app.task(backend=None)
    def unrecorded(path: str) -> str:
        from nbtask import current_request

        request = current_request()
        assert request is not None
        with open(path, "a") as f:
            f.write(f"{request.id}\n")
        return request.id

    h = unrecorded.delay(str(ledger))
    wait_until(access.waiting, 5, "the message on its queue")
    raw = access.peek()
    worker = start_worker(concurrency=1)
    assert h.get(timeout=15) == h.id
    access.inject(raw, task_id=h.id)
    access.inject(raw)  # and without the id beside it
    wait_until(lambda: _log_count(worker, f"dropped a message for task {h.id}") == 2, 15, "drops")
    assert runs_in(ledger) == [h.id]


def test_state_reset_or_record_deleted_then_replayed_never_runs_again(
    app: App, access: RawBroker, start_worker, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    h, raw, worker = _sent_then_run(app, access, start_worker, ledger)
    record = access.keys.record_key(h.id)

    access.store.hset(record, "state", "PENDING")  # the plain field alone says "not run"
    access.inject(raw, task_id=h.id)
    wait_until(lambda: _log_count(worker, f"dropped a message for task {h.id}") == 1, 15, "drop")

    access.store.delete(record)  # the record gone: the ended task is remembered apart
    access.inject(raw, task_id=h.id)
    wait_until(lambda: _log_count(worker, f"dropped a message for task {h.id}") == 2, 15, "drop")
    wait_for_housekeeping(app)
    assert runs_in(ledger) == [h.id]


def test_state_reset_and_forgotten_as_ended_then_replayed_never_runs_again(
    app: App, access: RawBroker, start_worker, tmp_path: Path
) -> None:
    """The signed outcome kept in the record refuses a replay on its own: the plain state
    field says PENDING and the ended-task set no longer names the task."""
    ledger = tmp_path / "ledger"
    h, raw, worker = _sent_then_run(app, access, start_worker, ledger)
    access.store.hset(access.keys.record_key(h.id), "state", "PENDING")
    access.store.zrem(access.keys.done_key, h.id)
    access.inject(raw, task_id=h.id)
    wait_until(lambda: _log_count(worker, f"dropped a message for task {h.id}") == 1, 15, "drop")
    wait_for_housekeeping(app)
    assert runs_in(ledger) == [h.id]


def _started_by_the_live_child(app: App, access: RawBroker, task_id: str) -> None:
    """Rewrite a record's plain fields to "STARTED by the worker's own child": the
    registry names its host, pid and consumer to anyone with broker access."""
    seen: list[WorkerInfo] = []

    def child_listed() -> bool:  # kept as seen: a short heartbeat can lapse a moment after
        seen[:] = [i for i in app.workers().values() if i.pids and i.pids[0]]
        return bool(seen)

    wait_until(child_listed, 10, "the child's pid")
    [info] = seen
    fields = {
        "state": "STARTED",
        "worker": info.hostname,
        "pid": str(info.pids[0]),
        "consumer": info.consumers[0],
    }
    access.store.hset(access.keys.record_key(task_id), mapping=fields)


def test_replay_after_the_record_names_the_live_child_as_starter_never_runs_again(
    app: App, access: RawBroker, start_worker, tmp_path: Path
) -> None:
    """The "started by this very child" rule (a start check whose reply was lost) never
    outweighs the signed outcome or the ended-task entry."""
    ledger = tmp_path / "ledger"
    h, raw, worker = _sent_then_run(app, access, start_worker, ledger)
    _started_by_the_live_child(app, access, h.id)
    access.inject(raw, task_id=h.id)
    access.inject(raw)  # and without the id beside it
    wait_until(lambda: _log_count(worker, f"dropped a message for task {h.id}") == 2, 15, "drops")
    wait_for_housekeeping(app)
    assert runs_in(ledger) == [h.id]


def test_revoked_task_whose_record_names_the_live_child_as_starter_never_runs(
    app: App, access: RawBroker, start_worker, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    worker = start_worker(concurrency=1)
    h = app.send_task(RECORD_ID, (str(ledger),), countdown=1.5)
    assert app.revoke(h.id)
    _started_by_the_live_child(app, access, h.id)  # while its genuine message waits
    wait_until(lambda: _log_count(worker, f"dropped a message for task {h.id}") == 1, 15, "drop")
    wait_for_housekeeping(app)
    assert runs_in(ledger) == []
    assert access.drained()


@pytest.fixture
def short_max_age(monkeypatch: pytest.MonkeyPatch) -> float:
    """Workers refuse messages older than this (start_worker copies os.environ)."""
    monkeypatch.setenv("NBTASK_MAX_AGE", "2.0")
    return 2.0


def test_countdown_message_replayed_after_max_age_is_refused(
    app: App,
    access: RawBroker,
    start_worker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    short_max_age: float,
) -> None:
    """An ETA message ages from its signed due time: replayed after max_age, and after
    everything that remembered its task is gone, it is still refused.

    Its genuine run is a worker's that keeps the default max_age, however late that one
    starts; the replay goes to one that refuses messages older than ``short_max_age``.
    """
    ledger = tmp_path / "ledger"
    eta_key = access.keys.eta_key("default")
    h = app.send_task(RECORD_ID, (str(ledger),), countdown=0.3)
    [member] = access.store.zrange(eta_key, 0, -1)
    raw = member.partition(b":")[2]  # the message as parked for its due time
    monkeypatch.delenv("NBTASK_MAX_AGE")
    genuine = start_worker(concurrency=1)
    assert h.get(timeout=15) == h.id
    genuine.stop()
    monkeypatch.setenv("NBTASK_MAX_AGE", str(short_max_age))
    worker = start_worker(concurrency=1)
    due = time.time() + short_max_age + 0.5
    wait_until(lambda: time.time() > due, 10, "max_age to pass since its due time")
    access.store.delete(access.keys.record_key(h.id))  # expired, and forgotten as ended
    access.store.zrem(access.keys.done_key, h.id)
    access.inject(raw, task_id=h.id)
    wait_until(lambda: len(access.dead_letters()) == 1, 15, "the replay to be dead-lettered")
    assert access.dead_letters()[0][b"e"] == raw
    assert "older than max_age" in worker.log.read_text()
    wait_for_housekeeping(app)
    assert runs_in(ledger) == [h.id]


@pytest.fixture
def other_app(settings: Settings) -> Iterator[tuple[Settings, RawBroker]]:
    """A second app on the same broker with the same secret, under its own key prefix."""
    other = settings.replace(key_prefix=f"{settings.key_prefix}:b")
    access = raw_broker(other)
    yield other, access
    access.close()


def test_message_copied_to_another_app_or_queue_is_refused(
    app: App,
    access: RawBroker,
    start_worker,
    tmp_path: Path,
    other_app: tuple[Settings, RawBroker],
) -> None:
    other, other_access = other_app
    ledger = tmp_path / "ledger"
    h = app.send_task(RECORD_ID, (str(ledger),))
    wait_until(access.waiting, 5, "the message on its queue")
    raw = access.peek()
    # The other app's worker, same secret: the message is not for its key prefix.
    stranger = start_worker("--key-prefix", other.key_prefix, concurrency=1, wait=False)
    watcher = App("watcher", settings=other)
    try:
        wait_until(lambda: bool(watcher.workers()), 20, "the other app's worker")
    finally:
        watcher.close()
    other_access.inject(raw)
    wait_until(lambda: len(other_access.dead_letters()) == 1, 15, "the copy to be dead-lettered")
    assert other_access.dead_letters()[0][b"e"] == raw
    assert "was sent to key prefix" in stranger.log.read_text()
    assert runs_in(ledger) == []
    # Its own app, another queue: not for that queue either.
    worker = start_worker("-Q", "elsewhere", concurrency=1)
    access.inject(raw, queue="elsewhere")
    wait_until(lambda: len(access.dead_letters()) == 1, 15, "the copy to be dead-lettered")
    assert "queue 'default', not here" in worker.log.read_text()
    assert runs_in(ledger) == []
    # The genuine message still runs once, on its own queue.
    start_worker(concurrency=1)
    assert h.get(timeout=15) == h.id
    assert runs_in(ledger) == [h.id]


def test_an_earlier_or_another_apps_final_event_does_not_end_a_task_reusing_its_id(
    app: App,
    access: RawBroker,
    start_worker,
    other_app: tuple[Settings, RawBroker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Task ids chosen by the user are used again once a record is gone (``result_ttl``),
    and another app with the same secret may use them too: their genuine final events,
    put on the client's channel, are not this task's."""
    caplog.set_level(logging.WARNING, logger="nbtask.client.listener")
    other, _ = other_app
    task_id, earlier, foreign = _an_id_used_twice_then_freed(app, access, start_worker, other_app)
    h = app.send_task(ADD, (10, 20), task_id=task_id, queue="later")  # no worker there yet
    for raw in (earlier, foreign):
        access.push_event(app.channel, raw)

    def dropped() -> list[str]:
        return [r.getMessage() for r in caplog.records if "dropped an event" in r.getMessage()]

    wait_until(lambda: h.done() or len(dropped()) == 2, 15, "both events read")
    assert not h.done(), f"a replayed event ended the task: {h.state}"
    assert "another send of a task with that id" in dropped()[0]
    assert f"key prefix {other.key_prefix!r}" in dropped()[1]
    start_worker("-Q", "later", concurrency=1)
    assert h.get(timeout=15) == 30


def _an_id_used_twice_then_freed(
    app: App, access: RawBroker, start_worker, other_app: tuple[Settings, RawBroker]
) -> tuple[str, bytes, bytes]:
    """A task id used by another app with the same secret, then by ``app``, whose record
    and ended-task entry are then gone (``result_ttl`` passed): the id is free again.

    Returns the id and the genuine stored results of ``app``'s send and the other app's.
    """
    other, other_access = other_app
    task_id = uuid.uuid4().hex
    start_worker("--key-prefix", other.key_prefix, concurrency=1, wait=False)
    stranger = App("stranger", settings=other)
    try:
        assert stranger.send_task(ADD, (1, 1), task_id=task_id).get(timeout=15) == 2
    finally:
        stranger.close()
    foreign = other_access.store.hget(other_access.keys.record_key(task_id), "result")
    record = access.keys.record_key(task_id)
    h = app.send_task(ADD, (2, 3), task_id=task_id)
    # Its events come live only: on RabbitMQ, one kept before the client's reply queue
    # began comes from the stream's catch-up, and a copy put on the queue later is taken
    # for its live copy (dropped, no log line).
    access.wait_for_channel(app.channel)
    start_worker(concurrency=1)
    assert h.get(timeout=15) == 5
    earlier = access.store.hget(record, "result")
    access.store.delete(record)
    access.store.zrem(access.keys.done_key, task_id)
    return task_id, earlier, foreign


@pytest.mark.brokers("redis")  # the store is Redis on both brokers
def test_an_earlier_or_another_apps_result_in_the_record_is_not_taken_by_reference(
    app: App, access: RawBroker, start_worker, other_app: tuple[Settings, RawBroker]
) -> None:
    """A handle passed as an argument is read by the worker from the task's record: a
    genuine result of an earlier send of the id, or another app's (same secret), put in
    that record is not the handle's, and the consuming task fails saying so."""
    task_id, earlier, foreign = _an_id_used_twice_then_freed(app, access, start_worker, other_app)
    record = access.keys.record_key(task_id)
    h = app.send_task(ADD, (10, 20), task_id=task_id)
    assert h.get(timeout=15) == 30
    assert app.send_task(ADD, (h, 1)).get(timeout=15) == 31  # its own result is taken
    for raw, why in ((earlier, "another send of a task with that id"), (foreign, "key prefix")):
        access.store.hset(record, "result", raw)
        with pytest.raises(nbtask.SignatureError, match=why):
            value = app.send_task(ADD, (h, 1)).get(timeout=15)
            pytest.fail(f"the consuming task took {value - 1} for the handle's result 30")


def test_the_ended_task_memory_goes_result_ttl_after_its_last_write(
    app: App, access: RawBroker, start_worker, tmp_path: Path
) -> None:
    """Workers trim ``<prefix>:done`` to max_age; once none is left to, it still goes."""
    done = access.keys.done_key
    revoked = app.send_task(RECORD_ID, (str(tmp_path / "ledger"),))
    assert app.revoke(revoked.id) is True
    assert 0 < access.store.ttl(done) <= app.settings.result_ttl
    access.store.persist(done)
    start_worker(concurrency=1)
    ran = app.send_task(RECORD_ID, (str(tmp_path / "ledger"),))
    assert ran.get(timeout=15) == ran.id
    assert access.store.zscore(done, ran.id) is not None
    # (A worker pushes it back once a second: a little past result_ttl, see WRITE_FINAL.)
    assert 0 < access.store.ttl(done) <= app.settings.result_ttl + 2 * EXPIRY_UPKEEP_SECONDS


def test_a_message_for_another_queue_left_on_a_dead_process_queue_is_not_moved(
    app: App, access: RawBroker, start_worker, tmp_path: Path
) -> None:
    """A dead process's own queue is emptied into the queue its messages fall back to,
    sealed again for it: only a message sent to that very queue may be."""
    ledger = tmp_path / "ledger"
    h = app.send_task(RECORD_ID, (str(ledger),), queue="gpu")  # nobody serves gpu yet
    app.flush()
    wait_until(lambda: access.waiting("gpu"), 5, "the message on its queue")
    raw = access.peek("gpu")
    access.inject(raw, task_id=h.id, queue=holder_queue("ghost-0"))
    access.forge_dead_process("ghost-0")
    worker = start_worker(concurrency=1)  # serves default, the queue it would go to
    wait_until(lambda: bool(access.dead_letters() or runs_in(ledger)), 15, "the copy refused")
    assert runs_in(ledger) == [], "a message sent to queue gpu ran on default"
    assert [f[b"e"] for f in access.dead_letters()] == [raw]
    assert _log_count(worker, "was sent to key prefix") == 1
    # The genuine message still runs once, on its own queue.
    start_worker("-Q", "gpu", concurrency=1)
    assert h.get(timeout=15) == h.id
    assert runs_in(ledger) == [h.id]


def test_a_message_older_than_max_age_left_on_a_dead_process_queue_is_refused(
    app: App,
    access: RawBroker,
    start_worker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Moving a message off a dead process's queue keeps its signed age: a replay there
    after max_age, once everything that remembered its task is gone, is still refused.

    max_age leaves room for the genuine run first: a worker starting and cleaning up the
    dead process on a busy machine takes seconds."""
    short_max_age = 10.0
    monkeypatch.setenv("NBTASK_MAX_AGE", str(short_max_age))
    ledger = tmp_path / "ledger"
    own = holder_queue("ghost-0")
    h = app.send_task(RECORD_ID, (str(ledger),), queue=own)
    app.flush()
    wait_until(lambda: access.waiting(own), 5, "the message on its queue")
    raw = access.peek(own)
    access.forge_dead_process("ghost-0")
    worker = start_worker(concurrency=1)
    assert h.get(timeout=15) == h.id  # moved to default, and run there

    due = time.time() + short_max_age + 0.5
    wait_until(lambda: time.time() > due, 15, "max_age to pass since it was sent")
    access.store.delete(access.keys.record_key(h.id))  # expired, and forgotten as ended
    access.store.zrem(access.keys.done_key, h.id)
    access.inject(raw, task_id=h.id, queue=own)
    access.forge_dead_process("ghost-0")
    wait_until(
        lambda: "older than max_age" in worker.log.read_text() or len(runs_in(ledger)) > 1,
        15,
        "the replay to be refused",
    )
    wait_for_housekeeping(app)
    assert runs_in(ledger) == [h.id], "a message older than max_age ran again"
    assert _log_count(worker, "older than max_age") == 1


# Acknowledged early (WORKER_LOST if its worker is lost), and late (run again then).
RUNNING_TASKS = ["tests.sample_tasks.slow_early", "tests.sample_tasks.slow_marker"]


def _running(
    app: App, access: RawBroker, start_worker, marker: Path, name: str
) -> tuple[nbtask.TaskHandle, bytes, object]:
    """A task running for a few seconds on a worker with an idle child, its message as
    sent, and the worker."""
    h = app.send_task(name, (str(marker), 4.0))
    app.flush()
    wait_until(access.waiting, 5, "the message on its queue")
    raw = access.peek()
    worker = start_worker(concurrency=2)
    wait_until(marker.exists, 15, "the task to start")
    return h, raw, worker


@pytest.mark.parametrize("name", RUNNING_TASKS)
def test_a_copy_of_a_running_tasks_message_made_to_look_lost_does_not_end_it(
    app: App, access: RawBroker, start_worker, tmp_path: Path, name: str
) -> None:
    """A copy of a running task's message made to look like a dead holder's delivery (on
    RabbitMQ under another task id, the one the parked entry is known by): the task is
    neither reported WORKER_LOST nor run again; it runs on, once, and its client gets its
    result."""
    marker = tmp_path / "marker"
    h, raw, worker = _running(app, access, start_worker, marker, name)
    access.inject_lost(raw, "other-id")
    pid = h.get(timeout=30)
    assert [int(line) for line in marker.read_text().split()] == [pid]
    assert access.record(h.id)[b"state"] == b"SUCCESS"
    assert _log_count(worker, f"dropped a copy of task {h.id}") == 1
    wait_for_housekeeping(app)
    assert access.drained()


def test_a_finished_tasks_message_made_to_look_lost_leaves_its_signed_result(
    app: App,
    settings: Settings,
    access: RawBroker,
    start_worker,
    tmp_path: Path,
) -> None:
    """The same with a finished task whose plain state field was rewritten to STARTED:
    its signed outcome says it ended, and a restarted kernel still gets its result."""
    h, raw, _ = _sent_then_run(app, access, start_worker, tmp_path / "ledger")
    access.store.hset(access.keys.record_key(h.id), "state", "STARTED")
    access.inject_lost(raw, h.id)
    wait_until(access.drained, 15, "the copy to be settled")
    # Its client's channel keeps the one outcome, never a WORKER_LOST (the stored result is
    # sent again to a live client on RabbitMQ only: a Redis channel is where it is kept).
    kept = access.stored_event_types(app.signer, app.channel, h.id)
    assert kept.count("success") == 1 and "worker_lost" not in kept, kept
    assert access.record(h.id)[b"state"] == b"STARTED"  # the plain field left as rewritten
    reader = App("reader", settings=settings)
    try:
        assert reader.handle(h.id).get(timeout=5) == h.id
    finally:
        reader.close()


@pytest.mark.parametrize("state", ["PENDING", "RETRY"])
def test_a_lost_delivery_past_max_age_of_a_task_that_never_started_is_refused(
    app: App,
    access: RawBroker,
    start_worker,
    tmp_path: Path,
    short_max_age: float,
    state: str,
) -> None:
    """A dead holder's delivery past max_age of a task that never started (waiting for its
    first run, or for its next one after a retry) is refused as too old, as a worker taking
    it would refuse it: neither run nor reported lost by a worker that never ran it."""
    ledger = tmp_path / "ledger"
    sent = time.time()
    h = app.send_task(RECORD_ID, (str(ledger),), queue="unserved")
    raw = access.captured("unserved")
    access.store.hset(access.keys.record_key(h.id), "state", state)
    wait_until(lambda: time.time() > sent + short_max_age + 0.5, 10, "max_age to pass")
    worker = start_worker(concurrency=1)
    access.inject_lost(raw, h.id)
    with pytest.raises(nbtask.NbtaskError, match="older than max_age"):
        h.get(timeout=30)
    assert runs_in(ledger) == []
    assert _log_count(worker, "WORKER_LOST") == 0
