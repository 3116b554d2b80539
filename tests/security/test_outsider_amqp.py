"""RabbitMQ only: an outsider who can publish to, declare and delete nbtask's queues.

Someone with RabbitMQ (and store) access but not the secret sets every property of the
messages they publish, and declares or deletes queues by nbtask's names. Whatever they
do, a real worker never runs or unpickles what they sent, says in one line what it
refused, and keeps serving; a task sent after the attack still runs and its result
reaches the client; and a queue nbtask cannot use is named, with what to do about it.
"""

from __future__ import annotations

import datetime
import logging
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import amqp
import amqp.serialization
import kombu
import pytest
from helpers import AMQP_URL, RECORD_ID, wait_until
from raw_broker import RawBroker
from worker_process import WorkerProcess

from nbtask import App, BrokerUnavailable

pytestmark = pytest.mark.brokers("amqp")

ADD_TASK = "tests.sample_tasks.add"
WAIT_TASK = "tests.sample_tasks.wait_for_file"


@pytest.fixture
def channel() -> Iterator[Any]:
    """A channel of the outsider's own connection to RabbitMQ."""
    with kombu.Connection(AMQP_URL, connect_timeout=5) as conn:
        yield conn.channel()


def task_queue(app: App) -> str:
    return f"{app.settings.key_prefix}:q:default"


def log_lines(worker: WorkerProcess, word: str) -> list[str]:
    return [line for line in worker.log.read_text().splitlines() if word in line]


# Properties py-amqp cannot read ----------------------------------------------------------
def _message_id(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    return {"message_id": b"\xff\xfe not UTF-8"}


def _content_type(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    return {"content_type": b"application/\xff"}


def _timestamp(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    # py-amqp writes a datetime header as seconds since 1970: make those 2**62, far past
    # the year 9999 a reader's datetime can hold.
    far = types.SimpleNamespace(timegm=lambda t: 1 << 62)
    monkeypatch.setattr(amqp.serialization, "calendar", far)
    return {"application_headers": {"sent": datetime.datetime(2020, 1, 1)}}


def _nested(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    table: dict[str, Any] = {"end": 1}
    for _ in range(3000):  # deeper than a reader's recursion limit
        table = {"n": table}
    sys.setrecursionlimit(20_000)  # for writing it here (the test restores it)
    return {"application_headers": table}


UNREADABLE: dict[str, Callable[[pytest.MonkeyPatch], dict[str, Any]]] = {
    "message-id-not-utf8": _message_id,
    "content-type-not-utf8": _content_type,
    "header-timestamp-past-9999": _timestamp,
    "headers-nested-3000-deep": _nested,
}


@pytest.mark.parametrize("kind", list(UNREADABLE))
def test_a_message_whose_properties_cannot_be_read_is_dead_lettered(
    kind: str,
    app: App,
    access: RawBroker,
    start_worker: Callable[..., WorkerProcess],
    channel: Any,
) -> None:
    """py-amqp raised reading such properties, and RabbitMQ gave the message back to the
    next connection for ever: the worker served nothing after it."""
    worker = start_worker(concurrency=1)
    children = {c.pid for c in worker.children()}
    limit = sys.getrecursionlimit()
    body = f"forged: {kind}".encode()
    try:
        with pytest.MonkeyPatch.context() as patch:
            properties = UNREADABLE[kind](patch)
            channel.basic_publish(amqp.Message(body, **properties), "", task_queue(app))
    finally:
        sys.setrecursionlimit(limit)

    wait_until(lambda: len(access.dead_letters()) == 1, 15, "the message to be dead-lettered")
    assert [fields[b"e"] for fields in access.dead_letters()] == [body]
    assert app.send_task(ADD_TASK, (2, 2)).get(timeout=15) == 4
    lines = log_lines(worker, "rejected message")
    assert len(lines) == 1 and "its properties cannot be read" in lines[0], lines
    log = worker.log.read_text()
    assert "Traceback" not in log and "broker unreachable" not in log, log
    assert {c.pid for c in worker.children()} == children, log
    assert access.drained()


@pytest.fixture
def fanout(app: App, channel: Any) -> Iterator[str]:
    """An exchange of the outsider's, with nbtask's task queue bound to it."""
    name = f"{app.settings.key_prefix}-outsider"
    channel.exchange_declare(name, "fanout", durable=False, auto_delete=False)
    channel.queue_declare(queue=task_queue(app), durable=True, auto_delete=False)
    channel.queue_bind(task_queue(app), name)
    yield name
    channel.exchange_delete(name)


def test_a_delivery_whose_routing_key_is_not_utf8_is_dead_lettered(
    app: App,
    access: RawBroker,
    start_worker: Callable[..., WorkerProcess],
    channel: Any,
    fanout: str,
) -> None:
    """Through an exchange bound to the task queue, the routing key is the publisher's:
    py-amqp raised reading it after the message was taken, and the child, holding its
    one unacknowledged message, was given nothing more."""
    worker = start_worker(concurrency=1)
    body = b"forged, routed with a key that is not UTF-8"
    channel.basic_publish(amqp.Message(body), fanout, b"\xff\xfe")

    wait_until(lambda: len(access.dead_letters()) == 1, 15, "the message to be dead-lettered")
    assert [fields[b"e"] for fields in access.dead_letters()] == [body]
    assert app.send_task(ADD_TASK, (2, 2)).get(timeout=15) == 4
    assert len(log_lines(worker, "rejected message")) == 1
    assert "Traceback" not in worker.log.read_text()
    assert access.drained()


def test_a_message_for_another_queue_routed_here_through_an_exchange_is_refused(
    app: App,
    access: RawBroker,
    start_worker: Callable[..., WorkerProcess],
    channel: Any,
    fanout: str,
    tmp_path: Path,
) -> None:
    """A worker took a delivery's queue from its routing key, which the publisher sets:
    a genuine message for queue "gpu", published through an exchange bound to "default"
    with the routing key of "gpu", ran on a worker serving "default" alone."""
    marker = tmp_path / "ran"
    handle = app.send_task(RECORD_ID, (str(marker),), queue="gpu")
    app.flush()
    genuine = access.peek(queue="gpu")  # a copy: the message stays on "gpu"
    worker = start_worker(concurrency=1)  # serves "default" alone
    channel.basic_publish(amqp.Message(genuine), fanout, f"{app.settings.key_prefix}:q:gpu")

    wait_until(lambda: len(access.dead_letters()) == 1, 15, "the copy to be dead-lettered")
    assert not marker.exists(), "a task for queue 'gpu' ran on a worker of 'default'"
    [line] = log_lines(worker, "rejected message")
    assert "on queue default" in line and "'gpu'" in line, line
    start_worker("-Q", "gpu", concurrency=1)
    assert handle.get(timeout=15) == handle.id
    assert marker.read_text().splitlines() == [handle.id]


def test_a_reply_queue_message_whose_properties_cannot_be_read_is_dropped_in_one_line(
    app: App,
    start_worker: Callable[..., WorkerProcess],
    channel: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The listener's read raised (a traceback, then "cannot reach the AMQP broker")."""
    caplog.set_level(logging.WARNING, logger="nbtask")
    start_worker(concurrency=1)
    # A first result came through the reply queue: the listener has declared it.
    assert app.send_task(ADD_TASK, (1, 1)).get(timeout=15) == 2
    channel.basic_publish(amqp.Message(b"forged event", message_id=b"\xff\xfe"), "", app.channel)

    said = lambda: [r.getMessage() for r in caplog.records]  # noqa: E731
    wait_until(lambda: any("does not verify" in m for m in said()), 15, "the listener to drop it")
    assert app.send_task(ADD_TASK, (20, 22)).get(timeout=15) == 42
    assert len(said()) == 1, said()


# Queues deleted or declared by someone else ----------------------------------------------
def test_a_task_sent_after_its_queue_was_deleted_still_runs(
    app: App,
    access: RawBroker,
    start_worker: Callable[..., WorkerProcess],
    channel: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The client had declared the queue once: its next message went to no queue and was
    dropped by RabbitMQ (confirmed all the same), and the task stayed PENDING for ever."""
    worker = start_worker(concurrency=1)
    marker, go = tmp_path / "started", tmp_path / "go"
    busy = app.send_task(WAIT_TASK, (str(marker), str(go)))
    wait_until(marker.exists, 15, "the first task to start")
    channel.queue_delete(task_queue(app))  # while the worker's only child is busy

    after = app.send_task(ADD_TASK, (2, 3))
    go.touch()
    assert busy.get(timeout=15) == worker.children()[0].pid
    assert after.get(timeout=15) == 5
    assert access.queue_exists("default")
    said = [r.getMessage() for r in caplog.records if "was gone" in r.getMessage()]
    assert len(said) == 1 and task_queue(app) in said[0], said
    assert app.send_task(ADD_TASK, (3, 4)).get(timeout=15) == 7
    assert "Traceback" not in worker.log.read_text()


def test_a_queue_deleted_while_the_worker_waits_for_its_next_task_is_not_an_outcome_error(
    app: App,
    access: RawBroker,
    start_worker: Callable[..., WorkerProcess],
    channel: Any,
) -> None:
    """A child that stored and acknowledged a task's outcome waits for its next message
    in the same call: the consumer cancelled there was taken for a failure to store the
    outcome, which was then stored and sent to the client once more."""
    worker = start_worker(concurrency=1)
    handle = app.send_task(ADD_TASK, (1, 2))
    assert handle.get(timeout=15) == 3
    # Its result can reach the client (from the store) before the worker's ack leaves.
    wait_until(lambda: access.drained("default"), 15, "the first task's acknowledgement")
    channel.queue_delete(task_queue(app))  # while the child waits for its next message

    assert app.send_task(ADD_TASK, (2, 3)).get(timeout=15) == 5
    log = worker.log.read_text()
    assert "cannot store the outcome" not in log and "cannot acknowledge" not in log, log
    kept = access.stored_event_types(app.signer, app.channel, handle.id)
    assert kept.count("success") == 1, kept


def test_a_reply_queue_someone_else_holds_still_brings_the_results(
    app: App,
    start_worker: Callable[..., WorkerProcess],
    channel: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The reply queue's name is in every record in the store: declared first, exclusive
    to another connection, it made the listener say "cannot reach the AMQP broker" again
    and again, and handles stay PENDING though their tasks had ended."""
    caplog.set_level(logging.WARNING, logger="nbtask")
    channel.queue_declare(queue=app.channel, durable=False, exclusive=True, auto_delete=True)
    start_worker(concurrency=1)

    assert app.send_task(ADD_TASK, (2, 3)).get(timeout=15) == 5
    assert app.send_task(ADD_TASK, (3, 4)).get(timeout=15) == 7
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and f"the reply queue {app.channel} is held" in said[0], said


PRE_DECLARED: dict[str, dict[str, Any]] = {
    "max-length-0": {"arguments": {"x-max-length": 0}},
    "message-ttl-1ms": {"arguments": {"x-message-ttl": 1}},
    "dead-letter-exchange": {"arguments": {"x-dead-letter-exchange": "amq.fanout"}},
    "auto-delete": {"auto_delete": True},
    "exclusive": {"exclusive": True, "durable": False},
}


# RabbitMQ's words for a queue declared with other properties, or held exclusive.
RABBITMQ_REASONS = ("PRECONDITION_FAILED - inequivalent arg", "RESOURCE_LOCKED")


@pytest.mark.parametrize("kind", list(PRE_DECLARED))
def test_a_queue_declared_beforehand_with_other_properties_is_named_with_the_fix(
    kind: str,
    app: App,
    start_worker: Callable[..., WorkerProcess],
    channel: Any,
) -> None:
    """Said "cannot reach the AMQP broker ... Is RabbitMQ running there?", which it was."""
    name = task_queue(app)
    declared = {"durable": True, "auto_delete": False, **PRE_DECLARED[kind]}
    channel.queue_declare(queue=name, **declared)

    worker = start_worker(concurrency=1, wait=False)
    assert worker.process.wait(30) != 0
    lines = log_lines(worker, "error:")
    assert len(lines) == 1, worker.log.read_text()
    with pytest.raises(BrokerUnavailable) as refused:
        app.send_task(ADD_TASK, (1, 1))
    for said in (lines[0], str(refused.value)):
        assert f"cannot use the queue '{name}'" in said and "delete_queue" in said, said
        assert any(reason in said for reason in RABBITMQ_REASONS), said
        assert "Is RabbitMQ running" not in said, said
    assert channel.queue_declare(queue=name, passive=True).message_count == 0  # nothing sent

    channel.queue_delete(name)  # the operator's fix
    start_worker(concurrency=1)
    assert app.send_task(ADD_TASK, (2, 2)).get(timeout=15) == 4
