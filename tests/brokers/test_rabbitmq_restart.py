"""A real RabbitMQ server restart: queued tasks survive it, clients and workers carry on.

The tests run on a RabbitMQ node of the module's own (:class:`~private_rabbitmq.
PrivateRabbitMQ`; the shared server at 5672 is never stopped), stopped as an operator
does (``rabbitmqctl stop``) and started again on the same data directory. What a restart
does on the server, and a TCP proxy's cut does not: every exclusive queue
(each client's reply queue) and every consumer is gone, unacknowledged deliveries go
back to their durable queue, and only persistent messages on durable queues are kept.

The result store is the shared Redis, under each test's own key prefix. The module's
``settings`` fixture overrides conftest's, so conftest's ``app`` and ``start_worker`` use
the private node (workers get ``NBTASK_RESULT_URL`` from the environment).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from helpers import RECORD_ID, SECRET, wait_until
from private_rabbitmq import PrivateRabbitMQ, missing

from nbtask import App, BrokerUnavailable, Settings, TaskRevoked

ADD = "tests.sample_tasks.add"
WAIT_FOR_FILE = "tests.sample_tasks.wait_for_file"  # early ack unless sent acks_late


@pytest.fixture(scope="module")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRabbitMQ]:
    """The module's RabbitMQ node; a machine without rabbitmq-server fails, saying so."""
    why = missing()
    if why is not None:
        pytest.fail(why)
    node = PrivateRabbitMQ(tmp_path_factory.mktemp("rabbitmq"))
    try:
        node.start()
        yield node
    finally:
        node.close()


@pytest.fixture
def settings(
    rabbitmq: PrivateRabbitMQ, redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """Settings on the private node, with short heartbeats so failures show up fast."""
    rabbitmq.running()
    monkeypatch.setenv("NBTASK_RESULT_URL", redis_url)  # read by the worker processes
    return Settings(
        secret=SECRET,
        key_prefix=prefix,
        heartbeat_interval=0.2,
        visibility_timeout=2.0,
        result_ttl=600.0,
        broker_url=rabbitmq.url,
        result_url=redis_url,
    )


def runs(ledger: Path) -> Counter[str]:
    """How many times each task id was run, from ``record_id``'s ledger."""
    return Counter(ledger.read_text().split()) if ledger.exists() else Counter()


def pids_in(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def reply_queue_declared(rabbitmq: PrivateRabbitMQ, app: App) -> bool:
    """Whether the client's reply queue exists on the node (it is exclusive: a restart
    deletes it, and only the client declares it again)."""
    return app.channel in rabbitmq.queues()


def leftover(rabbitmq: PrivateRabbitMQ, app: App, r: redis.Redis) -> dict[str, int]:
    """The test's messages still on a task queue (ready or unacknowledged), and the
    redelivered copies parked in the store for a supervisor to settle."""
    prefix = app.settings.key_prefix
    left = {name: n for name, n in rabbitmq.queues().items() if name.startswith(f"{prefix}:q:")}
    return {**left, "parked lost": int(r.zcard(f"{prefix}:lost"))}


def wait_drained(rabbitmq: PrivateRabbitMQ, app: App, r: redis.Redis) -> None:
    try:
        wait_until(lambda: not any(leftover(rabbitmq, app, r).values()), 20, "nothing left")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; left: {leftover(rabbitmq, app, r)}") from None


def test_tasks_queued_before_a_rabbitmq_restart_run_once_after_it(
    app: App, start_worker, rabbitmq: PrivateRabbitMQ, r: redis.Redis, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    early = [app.send_task(RECORD_ID, (str(ledger),)) for _ in range(4)]
    late = [app.send_task(RECORD_ID, (str(ledger),), acks_late=True) for _ in range(2)]
    app.flush()  # RabbitMQ confirmed them: they are on the durable queue, persistent
    wait_until(lambda: reply_queue_declared(rabbitmq, app), 20, "the client's reply queue")
    queue = f"{app.settings.key_prefix}:q:{app.settings.default_queue}"
    assert rabbitmq.queues().get(queue, 0) == 6, rabbitmq.queues()
    # Not confirmed yet when the server goes: on the server, or sent again after it.
    unconfirmed = [app.send_task(RECORD_ID, (str(ledger),)) for _ in range(3)]

    rabbitmq.restart()  # no worker runs: the messages wait through it

    assert rabbitmq.queues().get(queue, 0) >= 6, rabbitmq.queues()
    start_worker(concurrency=2)
    handles = early + late + unconfirmed
    # The same client, which never saw the restart, reconnects and gets every result.
    assert [h.get(timeout=60) for h in handles] == [h.id for h in handles]
    assert runs(ledger) == {h.id: 1 for h in handles}
    for handle in handles:
        assert app.store.get_record(handle.id).state == "SUCCESS"
    wait_until(lambda: reply_queue_declared(rabbitmq, app), 20, "the reply queue again")
    wait_drained(rabbitmq, app, r)


def test_tasks_running_and_queued_across_a_rabbitmq_restart_finish_and_report(
    app: App, start_worker, rabbitmq: PrivateRabbitMQ, r: redis.Redis, tmp_path: Path
) -> None:
    worker = start_worker(concurrency=2)
    go = tmp_path / "go"
    early_marker, late_marker = tmp_path / "early", tmp_path / "late"
    early = app.send_task(WAIT_FOR_FILE, (str(early_marker), str(go), 90.0))
    late = app.send_task(WAIT_FOR_FILE, (str(late_marker), str(go), 90.0), acks_late=True)
    wait_until(
        lambda: len(pids_in(early_marker)) == len(pids_in(late_marker)) == 1, 30, "both to start"
    )
    ledger = tmp_path / "ledger"
    queued = [app.send_task(RECORD_ID, (str(ledger),)) for _ in range(3)]  # both children busy
    # Parked in the store until due, which is about when the server is down.
    due = app.send_task(ADD, (50, 50), countdown=3.0)
    app.flush()

    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(early.get, timeout=90)  # a get() in progress through it all
        rabbitmq.restart()
        go.touch()  # the running tasks end after the restart: their outcomes go to a new server
        assert waiting.result() == pids_in(early_marker)[0]

    late_pid = late.get(timeout=60)
    assert [h.get(timeout=60) for h in queued] == [h.id for h in queued]
    assert runs(ledger) == {h.id: 1 for h in queued}
    assert due.get(timeout=60) == 100
    assert pids_in(early_marker) == [early.get()]  # early ack: never run again
    # acks_late: its delivery went back to the queue when the server stopped; the copy
    # RabbitMQ gives again is not run a second time while (or after) the first runs.
    assert pids_in(late_marker) == [late_pid]
    for handle in (early, late, *queued, due):
        assert app.store.get_record(handle.id).state == "SUCCESS"

    # The same worker process and the same client carry on.
    assert worker.process.poll() is None, worker.log.read_text()
    assert app.send_task(ADD, (20, 22)).get(timeout=30) == 42
    wait_until(lambda: reply_queue_declared(rabbitmq, app), 20, "the reply queue again")
    wait_drained(rabbitmq, app, r)


def test_a_delay_right_after_a_rabbitmq_restart_reconnects_by_itself(
    app: App, start_worker, rabbitmq: PrivateRabbitMQ
) -> None:
    worker = start_worker(concurrency=1)
    assert app.send_task(ADD, (1, 2)).get(timeout=30) == 3

    rabbitmq.restart()  # the client and the worker are idle: neither has seen it yet

    assert app.send_task(ADD, (2, 3)).get(timeout=60) == 5
    assert worker.process.poll() is None, worker.log.read_text()


def test_a_delay_while_rabbitmq_is_down_fails_clearly_and_works_once_it_is_back(
    app: App, start_worker, rabbitmq: PrivateRabbitMQ, tmp_path: Path
) -> None:
    worker = start_worker(concurrency=1)
    assert app.send_task(ADD, (1, 2)).get(timeout=30) == 3
    ledger = tmp_path / "ledger"

    rabbitmq.stop()
    unsent = None
    with pytest.raises(BrokerUnavailable) as down:
        # Raised by delay() itself, or (its connection not yet seen closed) by the flush.
        unsent = app.send_task(RECORD_ID, (str(ledger),))
        app.flush()
    assert f"127.0.0.1:{rabbitmq.port}" in str(down.value), down.value
    rabbitmq.start()

    assert app.send_task(ADD, (2, 3)).get(timeout=60) == 5
    if unsent is not None:  # its handle was returned: it says it never ran
        with pytest.raises(TaskRevoked):
            unsent.get(timeout=10)
    assert app.send_task(RECORD_ID, (str(ledger),)).get(timeout=30) in runs(ledger)
    assert len(runs(ledger)) == 1  # the task sent while RabbitMQ was down never ran
    assert worker.process.poll() is None, worker.log.read_text()
