"""Bookkeeping nbtask did not write (anyone with broker access can): one bad entry is
logged, dropped or quarantined, and never stops heartbeats, countdowns, recovery, a
listener or a command. Both brokers where it applies."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest
from helpers import wait_for_housekeeping, wait_until
from raw_broker import RawBroker

import nbtask
from nbtask import App, Settings, State
from nbtask.brokers import open_broker
from nbtask.cli import main
from nbtask.worker.lost import LostTasks

pytestmark = pytest.mark.brokers

ADD = "tests.sample_tasks.add"
SLOW_EARLY = "tests.sample_tasks.slow_early"
WAIT_FOR_FILE = "tests.sample_tasks.wait_for_file"


def pids_in(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def test_eta_member_without_a_task_id_is_quarantined_and_countdowns_go_on(
    app: App, access: RawBroker, start_worker
) -> None:
    access.store.zadd(access.keys.eta_key("default"), {b"no task id in here": time.time() - 1})
    worker = start_worker(concurrency=1)
    assert app.send_task(ADD, (1, 2), countdown=0.3).get(timeout=15) == 3
    wait_until(lambda: len(access.dead_letters()) == 1, 10, "the bad member to be set aside")
    assert access.dead_letters()[0][b"e"] == b"no task id in here"
    seen = max(i.seen for i in app.workers().values())
    wait_until(lambda: max(i.seen for i in app.workers().values()) > seen, 5, "a heartbeat")
    assert worker.log.read_text().count("without a task id") == 1


def test_ended_task_set_of_another_type_is_set_aside_and_tasks_go_on(
    app: App, access: RawBroker, start_worker, tmp_path: Path
) -> None:
    """``<prefix>:done`` overwritten while one task runs and others are sent: every task
    ends, the set is remembered again, and the worker says so once."""
    done = access.keys.done_key
    worker = start_worker(concurrency=1)
    marker = tmp_path / "marker"
    running = app.send_task(SLOW_EARLY, (str(marker), 1.0))
    wait_until(lambda: len(pids_in(marker)) == 1, 10, "the task to start")
    access.store.set(done, "not a sorted set")
    waiting = app.send_task(ADD, (1, 2))  # the client's write finds it too
    assert running.get(timeout=15) == pids_in(marker)[0]
    assert waiting.get(timeout=15) == 3
    assert access.store.zscore(done, waiting.id) is not None  # remembered again

    def logged() -> int:
        return worker.log.read_text().count(f"set aside {done}")

    before = logged()  # 0 or 1: the first task's end may have replaced it unseen
    access.store.set(done, "not a sorted set")  # with no task ending meanwhile
    wait_until(lambda: logged() == before + 1, 10, "the set to be set aside")
    assert app.send_task(ADD, (2, 2), countdown=0.2).get(timeout=15) == 4
    for _ in range(2):  # housekeeping runs, each of which would have set it aside again
        wait_for_housekeeping(app)
    assert logged() == before + 1  # once


def test_eta_set_of_another_type_is_set_aside_and_countdowns_go_on(
    app: App, access: RawBroker, start_worker
) -> None:
    eta = access.keys.eta_key("default")
    access.store.set(eta, "not a sorted set")
    parked = app.send_task(ADD, (1, 2), countdown=0.3)  # the client's write replaces it
    worker = start_worker(concurrency=1)
    assert parked.get(timeout=15) == 3
    access.store.set(eta, "not a sorted set")  # now found by the worker's housekeeping
    wait_until(lambda: f"set aside {eta}" in worker.log.read_text(), 10, "the set aside")
    assert app.send_task(ADD, (2, 2), countdown=0.3).get(timeout=15) == 4
    for _ in range(2):  # housekeeping runs, each of which would have set it aside again
        wait_for_housekeeping(app)
    assert worker.log.read_text().count(f"set aside {eta}") == 1
    assert "Traceback" not in worker.log.read_text()


def test_record_of_another_type_refuses_its_task_and_the_worker_serves_on(
    app: App, access: RawBroker, start_worker
) -> None:
    tampered = app.send_task(ADD, (1, 1))
    record = access.keys.record_key(tampered.id)
    access.store.delete(record)
    access.store.set(record, "not a hash")
    worker = start_worker(concurrency=1)
    with pytest.raises(nbtask.RemoteError, match="not one nbtask wrote"):
        tampered.get(timeout=15)
    assert [app.send_task(ADD, (i, i)).get(timeout=15) for i in range(3)] == [0, 2, 4]
    assert worker.log.read_text().count("rejected message") == 1


@pytest.mark.parametrize("how", ["another type", "ids used up"])
def test_a_dead_letter_stream_redis_refuses_entries_for_is_replaced_and_the_worker_serves_on(
    app: App, access: RawBroker, start_worker, how: str
) -> None:
    """A refused message is kept in the dead-letter stream before it is acknowledged: a
    stream Redis refuses it (a key of another type, or its ids used up) is replaced, with
    one log line, and the message is kept there and taken off its queue."""
    dead = access.keys.dead_letter_key
    if how == "another type":
        access.store.set(dead, "not a stream")
    else:
        access.store.xadd(dead, {"e": b"junk"}, id=f"{2**64 - 1}-{2**64 - 1}")
    worker = start_worker(concurrency=1)
    access.inject(b"not an nbtask message")
    assert [app.send_task(ADD, (i, i)).get(timeout=15) for i in range(3)] == [0, 2, 4]
    assert [f[b"e"] for f in access.dead_letters()] == [b"not an nbtask message"]
    assert access.drained()
    said = [line for line in worker.log.read_text().splitlines() if "did not write" in line]
    assert len(said) == 1 and dead in said[0], said


@pytest.mark.parametrize("how", ["another type", "ids used up"])
def test_a_control_stream_redis_refuses_entries_for_is_replaced_and_cancel_works(
    app: App, access: RawBroker, start_worker, tmp_path: Path, how: str
) -> None:
    """The control stream (how a cancel reaches the workers) planted while a worker reads
    it: before, ``h.cancel()`` raised Redis's own error (``WRONGTYPE``, or the ids used
    up), the task ran on, and the supervisor logged a traceback at every tick. Now the
    cancel replaces the stream (one log line), the worker deletes the entry past the
    clock rather than move past it, and the task is stopped."""
    control = access.keys.control_key
    worker = start_worker(concurrency=1)
    marker, go = tmp_path / "marker", tmp_path / "go"
    h = app.send_task(WAIT_FOR_FILE, (str(marker), str(go), 30.0))
    wait_until(lambda: access.record(h.id).get(b"state") == b"STARTED", 15, "the task to start")
    if how == "another type":
        access.store.delete(control)
        access.store.set(control, "not a stream")
    else:
        access.store.xadd(control, {"e": b"junk"}, id=f"{2**64 - 1}-{2**64 - 1}")
    # Read by the worker (the next tick, later on a loaded machine: waited for, not slept
    # for, or the cancel replaces it unread and the worker has nothing to say).
    wait_until(lambda: control in worker.log.read_text(), 15, "the worker to read it")
    assert h.cancel() is True
    with pytest.raises(nbtask.TaskRevoked):
        h.get(timeout=15)
    assert not go.exists() and len(marker.read_text().split()) == 1
    said = [line for line in worker.log.read_text().splitlines() if control in line]
    assert len(said) == 1, said
    assert "Traceback" not in worker.log.read_text()


def test_unreadable_registry_entries_do_not_stop_dead_worker_recovery(
    app: App, settings: Settings, access: RawBroker, start_worker, tmp_path: Path
) -> None:
    registry = f"{settings.key_prefix}:workers"
    access.store.hset(registry, b"\xff\xfe not utf-8", b"{}")
    access.store.hset(registry, "deeply-nested", "[" * 50_000 + "]" * 50_000)
    access.store.hset(registry, "not-json", b"\x00\x01\x02")
    start_worker(concurrency=1)
    start_worker(concurrency=1)
    marker = tmp_path / "marker"
    h = app.send_task(SLOW_EARLY, (str(marker), 30.0))
    wait_until(lambda: len(pids_in(marker)) == 1, 10, "the task to start")
    runner = psutil.Process(pids_in(marker)[0])
    supervisor = runner.parent()
    assert supervisor is not None
    supervisor.kill()  # the whole worker: the other one must notice and settle its task
    runner.kill()
    with pytest.raises(nbtask.WorkerLost):
        h.get(timeout=30)
    assert h.state is State.WORKER_LOST
    assert access.store.hget(registry, b"\xff\xfe not utf-8") is None  # dropped
    assert access.store.hget(registry, "deeply-nested") is None


def test_forged_channel_in_a_record_does_not_stop_the_listener(
    app: App, settings: Settings, access: RawBroker, start_worker
) -> None:
    not_a_stream = f"{settings.key_prefix}:c:{'a' * 16}"  # shaped like a channel, a hash
    access.store.hset(not_a_stream, "x", "y")
    access.store.hset(
        access.keys.record_key("forged-task"),
        mapping={"state": "STARTED", "name": "forged", "client": not_a_stream},
    )
    access.store.hset(
        access.keys.record_key("forged-two"),
        mapping={"state": "STARTED", "name": "forged", "client": f"{settings.key_prefix}:r:x"},
    )
    forged = app.handle("forged-task")  # what %tasks --all does for a listed task
    app.handle("forged-two")  # not shaped like a channel: never read at all
    start_worker()
    assert app.send_task(ADD, (2, 2)).get(timeout=15) == 4
    assert not forged.done()


@pytest.mark.brokers("redis")
def test_malformed_stream_entries_are_dead_lettered_or_run(
    app: App, access: RawBroker, start_worker
) -> None:
    """Fields of a queue entry are unsigned: a bad redelivery count reads as none, an entry
    without a message is dead-lettered; each is acknowledged either way."""
    genuine = app.send_task(ADD, (5, 5))
    raw = access.peek()
    stream = access.streams.queue_key("default")
    access.store.xtrim(stream, maxlen=0)
    access.store.xadd(stream, {"e": raw, "n": "many", "i": genuine.id})
    access.store.xadd(stream, {"x": "no message here", "i": "nothing"})
    worker = start_worker(concurrency=1)
    assert genuine.get(timeout=15) == 10
    wait_until(lambda: len(access.dead_letters()) == 1, 10, "the empty entry to be set aside")
    wait_until(access.drained, 10, "every entry to be acknowledged")
    assert "Traceback" not in worker.log.read_text()


@pytest.mark.brokers("redis")
def test_a_stored_result_that_is_not_an_outcome_is_followed_not_waited_on_forever(
    app: App, access: RawBroker, settings: Settings, start_worker, tmp_path: Path
) -> None:
    """A record's result holding a genuine event of the task that does not end it (its
    printed line, copied from the client's channel): a re-attached handle follows the
    task, and its result arrives."""
    marker, go = tmp_path / "marker", tmp_path / "go"
    start_worker(concurrency=1)
    h = app.send_task(WAIT_FOR_FILE, (str(marker), str(go)))
    wait_until(lambda: "waiting" in h.stdout, 15, "the task's printed line")
    entries = access.store.xrange(app.channel)
    printed = next(f[b"e"] for _, f in entries if b'"type":"stdout"' in f.get(b"e", b""))
    access.store.hset(access.keys.record_key(h.id), "result", printed)
    restarted = App("restarted", settings=settings)
    try:
        again = restarted.handle(h.id)
        go.touch()
        assert again.get(timeout=15) == h.get(timeout=15)
    finally:
        restarted.close()


@pytest.mark.brokers("redis")
def test_a_task_queue_whose_ids_are_used_up_is_repaired_and_a_lost_task_requeued_runs(
    app: App, access: RawBroker, start_worker, caplog: pytest.LogCaptureFixture
) -> None:
    """An entry put at the last possible id of a task queue leaves Redis no id to give:
    the requeue of a lost ``acks_late`` delivery there (a transaction that also drops the
    delivery) was refused, and the message was gone. Now the entries past the clock are
    deleted and the queue's last id set back, with one log line, and the message is
    added again; it runs."""
    transport = open_broker(app.settings, app.settings.broker_url or "")
    try:
        transport.ensure_queues(["default"])
        h = app.send_task(ADD, (2, 3), acks_late=True)
        delivery = transport.fetch(["default"], "test-consumer", 10)
        assert delivery is not None
        queue = access.streams.queue_key("default")
        access.store.xadd(queue, {"e": b"junk"}, id=f"{2**64 - 1}-{2**64 - 1}")
        LostTasks(transport, app.signer, app.settings).settle(delivery, "child died")
    finally:
        transport.close()
    said = [r.getMessage() for r in caplog.records if "past the clock" in r.getMessage()]
    assert len(said) == 1 and queue in said[0], said
    start_worker(concurrency=1)
    assert h.get(timeout=15) == 5
    assert app.send_task(ADD, (3, 4)).get(timeout=15) == 7  # the queue takes new tasks


@pytest.mark.brokers("redis")
def test_a_task_queue_replaced_by_another_type_is_replaced_and_a_lost_task_requeued_runs(
    app: App, access: RawBroker, start_worker, caplog: pytest.LogCaptureFixture
) -> None:
    """A task queue's stream replaced by a key of another type (someone with write access
    to Redis): the requeue of a lost ``acks_late`` delivery there was refused, the message
    dead-lettered and the task left ``PENDING`` for ever. Now the key is replaced by the
    queue (its stream and group), with one log line, and the message added again; it
    runs."""
    transport = open_broker(app.settings, app.settings.broker_url or "")
    try:
        transport.ensure_queues(["default"])
        h = app.send_task(ADD, (2, 3), acks_late=True)
        delivery = transport.fetch(["default"], "test-consumer", 10)
        assert delivery is not None
        queue = access.streams.queue_key("default")
        access.store.delete(queue)
        access.store.set(queue, "not a stream")
        LostTasks(transport, app.signer, app.settings).settle(delivery, "child died")
    finally:
        transport.close()
    start_worker(concurrency=1)
    assert h.get(timeout=15) == 5
    assert app.send_task(ADD, (3, 4)).get(timeout=15) == 7  # the queue takes new tasks
    said = [r.getMessage() for r in caplog.records if "not a stream" in r.getMessage()]
    assert len(said) == 1 and queue in said[0], said
    assert access.dead_letters() == []


@pytest.mark.brokers("redis")
def test_a_worker_starting_on_a_task_queue_of_another_type_replaces_it_and_serves(
    app: App, access: RawBroker, start_worker
) -> None:
    """The worker exited at start with Redis's WRONGTYPE traceback. Now it replaces the key
    by the queue, with one log line, and serves it."""
    queue = access.streams.queue_key("default")
    access.store.set(queue, "not a stream")
    worker = start_worker(concurrency=1)
    assert app.send_task(ADD, (3, 4)).get(timeout=15) == 7
    said = [line for line in worker.log.read_text().splitlines() if "not a stream" in line]
    assert len(said) == 1 and queue in said[0], said


def test_cli_reads_bad_registry_and_records_safely(
    settings: Settings, access: RawBroker, start_worker, tmp_path: Path, capsys
) -> None:
    start_worker(concurrency=1)
    registry = f"{settings.key_prefix}:workers"
    access.store.hset(registry, b"\xff\xfe", b"\xff")
    access.store.hset(
        access.keys.record_key("shouting"),
        mapping={"state": "SUCCESS", "name": "\x1b[31mred\x1b[0m\x07", "worker": b"\xff\xfe"},
    )
    secret = tmp_path / "secret"
    secret.write_text(settings.secret or "")
    common = ["-b", settings.broker_url or "", "--key-prefix", settings.key_prefix]
    common += ["--secret-file", str(secret)]
    assert main(["status", *common]) == 0
    status = capsys.readouterr().out
    assert "pid" in status and "\x1b" not in status
    assert main(["inspect", "shouting", *common]) == 0
    shown = capsys.readouterr().out
    assert "\x1b" not in shown and "\x07" not in shown and "red" in shown
