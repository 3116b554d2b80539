"""The kombu broker: the basics on both brokers, then what only AMQP has.

Faults, reliability and security run on both brokers in their own modules
(``brokers`` marker); ``memory://`` is covered by in-process tests of the broker object
(worker processes cannot share it).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import AMQP_URL, ROOT, SECRET, client_env, wait_for_housekeeping, wait_until
from raw_broker import RawBroker, raw_broker

import nbtask
from nbtask import App, Settings, State
from nbtask.brokers import Publish, open_broker
from nbtask.errors import ConfigurationError

SLOW_EARLY = "tests.sample_tasks.slow_early"  # early ack

pytestmark = pytest.mark.brokers


def pids_in(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def test_round_trip_main_function_by_value(app: App, start_worker, access: RawBroker) -> None:
    start_worker()
    assert app.send_task("tests.sample_tasks.add", (2, 3)).get(timeout=10) == 5

    @app.task
    def mul(x: int, y: int) -> int:
        return x * y

    assert mul.__module__ == __name__  # shipped by value: the worker cannot import this
    handle = mul.delay(6, 7)
    assert handle.get(timeout=10) == 42
    # The finished task's three effects: its result stored, one final event, its message
    # acknowledged (RabbitMQ may take the acknowledgement a moment after the event).
    record = access.record(handle.id)
    assert record[b"state"] == b"SUCCESS" and record.get(b"result"), record
    assert access.stored_event_types(app.signer, app.channel, handle.id).count("success") == 1
    wait_until(access.drained, 10, "the message acknowledged")


def test_many_concurrent_tasks_none_lost(app: App, start_worker) -> None:
    start_worker(concurrency=4)

    @app.task
    def square(x: int) -> int:
        return x * x

    handles = square.delay_many((x,) for x in range(300))
    assert [h.get(timeout=30) for h in handles] == [x * x for x in range(300)]
    assert all(app.store.get_record(h.id).state == "SUCCESS" for h in handles)


def test_countdown_runs_after_its_delay(app: App, start_worker) -> None:
    start_worker()

    @app.task
    def now() -> float:
        return time.time()

    sent = time.time()
    h = now.apply_async(countdown=1.0)
    ran = h.get(timeout=10)
    assert ran >= sent + 1.0


def test_remote_error(app: App, start_worker) -> None:
    start_worker()
    h = app.send_task("tests.sample_tasks.explode", ("boom",))
    with pytest.raises(ValueError) as info:
        h.get(timeout=10)
    assert "boom" in str(info.value)
    assert h.state is State.FAILURE


def test_revoke_queued_task_never_runs(app: App, start_worker, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    queued = app.send_task(SLOW_EARLY, (str(marker), 0.0))
    kept = app.send_task("tests.sample_tasks.add", (2, 2))
    assert app.revoke(queued.id) is True
    with pytest.raises(nbtask.TaskRevoked):
        queued.get(timeout=5)
    start_worker()
    assert kept.get(timeout=10) == 4
    wait_for_housekeeping(app)  # the revoked message was taken and dropped, not run
    assert not marker.exists()
    assert app.store.get_record(queued.id).state == "REVOKED"


def test_reattach_from_a_second_process(
    app: App, start_worker, settings: Settings, tmp_path: Path
) -> None:
    start_worker()
    marker = tmp_path / "marker"
    running = app.send_task(SLOW_EARLY, (str(marker), 1.5))
    done = app.send_task("tests.sample_tasks.add", (20, 22))
    assert done.get(timeout=10) == 42
    wait_until(marker.exists, 10, "the slow task to start")
    code = (
        "import sys\n"
        "from nbtask import App, Settings\n"
        "app = App('second', settings=Settings.from_env())\n"
        "print(app.handle(sys.argv[1]).get(timeout=15), app.handle(sys.argv[2]).get(timeout=15))\n"
        "app.close()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, running.id, done.id],
        env=client_env(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(running.get(timeout=10)), "42"]


# kombu only ------------------------------------------------------------------------------


def test_amqp_without_result_store_is_refused_with_how_to_fix(prefix: str) -> None:
    with pytest.raises(ConfigurationError, match="NBTASK_RESULT_URL") as info:
        App("x", settings=Settings(broker_url=AMQP_URL, secret=SECRET, key_prefix=prefix)).connect()
    assert "App(result_url=...)" in str(info.value), "the keyword App takes, as the README shows"


def test_memory_transport_round_trip_events_eta_and_redelivery(redis_url: str, prefix: str) -> None:
    url = "memory://"
    settings = Settings(broker_url=url, result_url=redis_url, secret=SECRET, key_prefix=prefix)
    broker = open_broker(settings, url)
    channel = f"{prefix}:c:me"
    try:
        broker.ping()
        broker.keep_channel(channel)
        assert broker.read_events({channel: "0-0"}, 0.1) == []
        record = {"state": "PENDING", "client": channel, "name": "t"}
        broker.publish([Publish("default", "t1", b"one", record)])
        delivery = broker.fetch(["default"], "c1", 2.0)
        assert delivery is not None and delivery.raw == b"one" and delivery.verdict == "OK"
        assert broker.store.get_record("t1").state == "STARTED"
        broker.emit(channel, [b"progress"])
        broker.finish(delivery, "t1", channel, b"final", {"state": "SUCCESS", "result": b"final"})
        raws = [raw for _, _, raw in broker.read_events({channel: "0-0"}, 1.0)]
        assert raws == [b"progress", b"final"]
        assert broker.store.replay(channel) == [b"progress", b"final"]  # kept in the store

        broker.publish([Publish("default", "t2", b"two", record, eta=time.time() + 0.3)])
        assert broker.fetch(["default"], "c1", 0.1) is None  # parked in the store
        time.sleep(0.35)
        assert broker.move_due(["default"]) is None
        later = broker.fetch(["default"], "c1", 2.0)
        assert later is not None and later.raw == b"two"

        # The consumer's connection dies holding t2 (STARTED): the redelivered copy is
        # parked as lost, and its supervisor gets it back as a pending delivery. (RabbitMQ
        # gives the message back when the connection closes; memory:// must be told.)
        other = open_broker(settings, url)
        broker.links.get().channel.basic_recover(requeue=True)  # type: ignore[attr-defined]
        broker.close()
        assert other.fetch(["default"], "c2", 0.5) is None
        lost = other.held(["default"], "c1")
        assert [(d.task_id, d.raw) for d in lost] == [("t2", b"two")]
        other.requeue(lost[0], "t2")
        again = other.fetch(["default"], "c2", 2.0)
        assert again is not None and again.verdict == "OK" and again.deliveries == 1
        other.close()
    finally:
        broker.close()


@pytest.mark.brokers("amqp")
def test_malformed_headers_and_text_bodies_are_dead_lettered(
    app: App, settings: Settings, start_worker
) -> None:
    """Anyone with broker access sets the headers and properties beside a message too."""
    import kombu

    worker = start_worker(concurrency=1)
    access = raw_broker(settings)
    sent = []
    try:
        with kombu.Connection(AMQP_URL) as conn:
            channel = conn.channel()
            for headers, encoding in [
                ({"nbtask-id": 12, "nbtask-deliveries": "many"}, "binary"),
                ({"nbtask-id": b"\xff\xfe", "nbtask-deliveries": -1}, "binary"),
                ({"nbtask-deliveries": 1 << 40}, "binary"),
                ({}, "utf-8"),  # py-amqp hands a text body over as str
            ]:
                raw = f"forged {len(sent)}".encode()
                message = channel.prepare_message(
                    raw, headers=headers, content_type="text/plain", content_encoding=encoding
                )
                channel.basic_publish(
                    message, exchange="", routing_key=f"{settings.key_prefix}:q:default"
                )
                sent.append(raw)
        wait_until(lambda: len(access.dead_letters()) == len(sent), 15, "all to be dead-lettered")
        assert [fields[b"e"] for fields in access.dead_letters()] == sent
        assert [int(fields[b"n"]) for fields in access.dead_letters()] == [0, 0, 0, 0]
        assert app.send_task("tests.sample_tasks.add", (2, 2)).get(timeout=15) == 4
        assert access.drained()
    finally:
        access.close()
    log = worker.log.read_text()
    assert log.count("rejected message") == len(sent), log
    assert "Traceback" not in log


def test_unreachable_result_store_is_named_and_its_password_hidden(prefix: str) -> None:
    store = "redis://:hunter2@127.0.0.1:1/0"  # nothing listens on port 1
    settings = Settings(broker_url=AMQP_URL, result_url=store, secret=SECRET, key_prefix=prefix)
    broker = open_broker(settings, AMQP_URL)
    try:
        with pytest.raises(nbtask.BrokerUnavailable) as info:
            broker.store.get_record("some-task")
    finally:
        broker.close()
    message = str(info.value)
    assert "result store" in message and "NBTASK_RESULT_URL" in message
    assert "hunter2" not in message and "127.0.0.1:1" in message


def test_kombu_is_a_lazy_import() -> None:
    code = "import nbtask, nbtask.brokers, sys; print('kombu' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


@pytest.mark.brokers("amqp")
def test_a_reply_read_that_does_not_wait_takes_an_event_already_sent(settings: Settings) -> None:
    reader = open_broker(settings, AMQP_URL)
    sender = open_broker(settings, AMQP_URL)
    channel = f"{settings.key_prefix}:c:no-wait"
    got: list[bytes] = []

    def read_now() -> bool:
        got.extend(raw for _, _, raw in reader.read_events({channel: "0-0"}, 0.0))
        return got == [b"event"]

    try:
        reader.keep_channel(channel)
        assert reader.read_events({channel: "0-0"}, 0.0) == []  # its reply queue declared
        sender.notify(channel, [b"event"])  # confirmed: on the queue, then on its way
        wait_until(read_now, 10, "the event, read without waiting")
    finally:
        reader.close()
        sender.close()


def _delete_as_a_clean_up_does(settings: Settings, queue: str) -> None:
    """Delete ``queue`` if empty and unconsumed, as a worker cleaning up after one it takes
    for dead does with that worker's processes' own queues."""
    cleaner = open_broker(settings, AMQP_URL)
    try:
        assert cleaner.drop_queue(queue)
    finally:
        cleaner.close()


@pytest.mark.brokers("amqp")
def test_a_process_consumes_its_own_queue_again_after_someone_deleted_it(
    settings: Settings, access: RawBroker
) -> None:
    """A child serves its own queue, then (its grace over) only the shared ones; the
    queue, empty and unconsumed, is deleted; once it holds a value it serves it again.
    Its connection had declared the queue: it consumed without declaring, and RabbitMQ
    answered 404 NOT_FOUND."""
    child = open_broker(settings, AMQP_URL)
    try:
        assert child.fetch(["held.p-0", "default"], "p-0", 0.05) is None
        assert child.fetch(["default"], "p-0", 0.05) is None
        _delete_as_a_clean_up_does(settings, "held.p-0")
        assert child.fetch(["held.p-0", "default"], "p-0", 0.05) is None
        assert access.queue_exists("held.p-0")
    finally:
        child.close()


@pytest.mark.brokers("amqp")
def test_a_worker_whose_process_queue_someone_deleted_still_stops_cleanly(
    app: App, settings: Settings, start_worker, access: RawBroker
) -> None:
    """Its supervisor had declared its processes' queues at its start: at its stop it read
    the deleted one without declaring it, got 404 NOT_FOUND, could not move what waits
    there, and left its queues and registry entry to another worker's clean-up."""
    worker = start_worker(concurrency=1)
    [info] = [i for i in app.workers().values() if i.pid == worker.pid]
    own = f"held.{info.consumers[0]}"
    _delete_as_a_clean_up_does(settings, own)

    log = worker.stops_on_one_sigterm()
    assert "could not move" not in log and "left queue" not in log, log
    assert not access.queue_exists(own)
    assert all(i.pid != worker.pid for i in app.workers().values())
