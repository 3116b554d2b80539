"""Publisher confirms on the real RabbitMQ: batched for a batch, pipelined for a loop.

A batch (``delay_many``) returns once RabbitMQ has confirmed all of it; a ``delay()``
returns once its message is written, and its confirm is collected later. These tests
check that neither way loses a task: a batch is whole in the queue when it returns, and
messages whose confirms never came back are sent again (or, if RabbitMQ cannot be
reached, revoked with their handles failing) rather than dropped.

The client reaches RabbitMQ through a :class:`~tcp_proxy.TcpProxy`; ``deafen()`` makes
it lose every confirm on the way back while its messages still reach RabbitMQ, ``hold()``
keeps its messages from reaching RabbitMQ at all. Workers and the store are reached
directly. The unconfirmed sends of a thread that ended, or whose link dropped, are in
``test_amqp_unconfirmed_threads.py``.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import kombu
import pytest
from helpers import AMQP_URL, RECORD_ID, ledger_runs, wait_until
from raw_broker import raw_broker
from tcp_proxy import TcpProxy, via

from nbtask import App, Settings, State, TaskHandle
from nbtask.brokers import amqp_links
from nbtask.brokers.amqp import AmqpTransport
from nbtask.brokers.amqp_link import Link
from nbtask.brokers.amqp_links import QUIET_SECONDS, Links
from nbtask.errors import BrokerUnavailable, TaskRevoked

pytestmark = pytest.mark.brokers("amqp")


def sending_link(app: App) -> Link:
    """The AMQP link of this thread that ``app`` sends on."""
    transport = app.transport
    assert isinstance(transport, AmqpTransport)
    link = transport.links.current()
    assert link is not None
    return link


def test_a_batch_is_whole_in_the_queue_when_delay_many_returns(
    app: App, start_worker, settings: Settings, tmp_path: Path
) -> None:
    @app.task
    def double(x: int) -> int:
        return 2 * x

    handles = double.delay_many((x,) for x in range(300))
    # Every confirm is in: nothing sent is waiting on RabbitMQ, and the queue holds it all.
    assert sending_link(app).confirms.unconfirmed == {}
    with kombu.Connection(AMQP_URL) as conn:
        queue = f"{settings.key_prefix}:q:{settings.default_queue}"
        _, waiting, _ = conn.default_channel.queue_declare(queue=queue, passive=True)
    assert waiting == 300
    start_worker(concurrency=2)
    assert [h.get(timeout=30) for h in handles] == [2 * x for x in range(300)]


def test_confirms_lost_with_their_connection_are_sent_again(
    client: App, proxy: TcpProxy, start_worker, settings: Settings, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    first = client.send_task(RECORD_ID, (str(ledger),))
    client.flush()
    proxy.deafen()  # messages still reach RabbitMQ; its confirms never come back
    handles = [client.send_task(RECORD_ID, (str(ledger),)) for _ in range(20)]
    assert len(sending_link(client).confirms.unconfirmed) == 20  # each delay() returned
    proxy.cut()

    client.flush()  # sends all 20 again on a new connection, and waits for their confirms
    assert sending_link(client).confirms.unconfirmed == {}
    start_worker(concurrency=2)
    everything = [first, *handles]
    assert [h.get(timeout=30) for h in everything] == [h.id for h in everything]
    # Both copies of each reached RabbitMQ: the start check ran one, dropped the other.
    assert ledger_runs(ledger) == {h.id: 1 for h in everything}
    access = raw_broker(settings)
    try:
        wait_until(access.drained, 10, "the second copies to be dropped")
    finally:
        access.close()


def test_unconfirmed_tasks_are_revoked_when_rabbitmq_cannot_be_reached(
    client: App, proxy: TcpProxy, start_worker, settings: Settings, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    first = client.send_task(RECORD_ID, (str(ledger),))  # connected, its queue declared
    client.flush()
    proxy.deafen()
    handles = [client.send_task(RECORD_ID, (str(ledger),)) for _ in range(5)]
    proxy.refuse()  # the connection drops and RabbitMQ cannot be reached again

    with pytest.raises(BrokerUnavailable, match="cannot reach the AMQP broker"):
        client.flush()
    for handle in handles:
        with pytest.raises(TaskRevoked, match="not confirmed by the broker") as info:
            handle.get(timeout=5)
        assert handle.id in str(info.value)
        assert client.store.get_record(handle.id).state is State.REVOKED

    # Their messages did reach RabbitMQ: a worker drops them, and runs new tasks.
    proxy.accept_again()
    start_worker(concurrency=1)
    probe = client.send_task(RECORD_ID, (str(ledger),))
    assert probe.get(timeout=20) == probe.id
    access = raw_broker(settings)
    try:
        wait_until(access.drained, 10, "the revoked tasks' messages to be dropped")
    finally:
        access.close()
    assert first.get(timeout=20) == first.id
    assert ledger_runs(ledger) == {first.id: 1, probe.id: 1}


def test_messages_rabbitmq_refuses_are_reported_not_dropped(prefix: str) -> None:
    links = Links(AMQP_URL)
    full = f"{prefix}:full"
    try:
        with links.using() as link:
            link.channel.queue_declare(
                queue=full,
                exclusive=True,
                arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
            )

        def send(link: Link) -> None:
            for i in range(3):
                links.send(link, full, b"body", persistent=False, task_id=f"task-{i}")

        links.publishing(send)  # RabbitMQ nacks each: the queue takes nothing
        assert sorted(links.take_unsent()) == ["task-0", "task-1", "task-2"]
        assert links.take_unsent() == []  # each is reported once
    finally:
        links.close()


def test_a_message_over_rabbitmqs_size_limit_is_refused_and_the_ones_after_it_get_through(
    prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RabbitMQ refuses a message over its max_message_size by closing the channel, with
    what was sent after it. Found after its publish returned, the message is reported,
    not sent again first on every new connection (each closed by it again, with the
    messages after it)."""
    monkeypatch.setattr(amqp_links, "QUIET_SECONDS", 3600.0)  # found by the flush only
    links = Links(AMQP_URL)
    queue = f"{prefix}:sizes"
    links.publishing(lambda link: links.queues.declare(link, queue))
    big = bytes(128 * 1024 * 1024 + 1)  # over RabbitMQ's default limit (128 MiB; 16 from 4.0)

    def send(raw: bytes, task_id: str) -> None:
        def publish(link: Link) -> None:
            links.send(link, queue, raw, persistent=False, task_id=task_id)

        links.publishing(publish, wait=False)

    try:
        send(big, "big")
        for i in range(3):
            send(f"small-{i}".encode(), f"small-{i}")
        links.flush()
        assert links.take_unsent() == ["big"]
        with links.using() as link:
            got = [m.body for m in links.queues.waiting(link, queue, ack=True)]
        assert got == [b"small-0", b"small-1", b"small-2"]
    finally:
        links.close()
        with kombu.Connection(AMQP_URL) as direct:
            direct.default_channel.queue_delete(queue)


def test_a_publish_rabbitmq_refuses_for_its_size_says_so(prefix: str) -> None:
    links = Links(AMQP_URL)
    queue = f"{prefix}:size"
    links.publishing(lambda link: links.queues.declare(link, queue))
    big = bytes(128 * 1024 * 1024 + 1)  # over RabbitMQ's default limit (128 MiB; 16 from 4.0)
    try:
        with pytest.raises(BrokerUnavailable, match="refused a message over its max_message_size"):
            links.publishing(lambda link: links.send(link, queue, big, persistent=False))
    finally:
        links.close()
        with kombu.Connection(AMQP_URL) as direct:
            direct.default_channel.queue_delete(queue)


def test_a_publish_after_a_quiet_spell_finds_a_connection_closed_meanwhile(
    proxy: TcpProxy, prefix: str
) -> None:
    """Writing to a connection the server closed succeeds: a publish that does not wait
    reads its link after a quiet spell, finds it closed and publishes on a new one."""
    links = Links(via(AMQP_URL, proxy.url_port))
    queue = f"{prefix}:quiet"
    direct = kombu.Connection(AMQP_URL)
    direct.default_channel.queue_declare(queue=queue, auto_delete=False)

    def send(link: Link) -> None:
        links.send(link, queue, b"body", persistent=False, task_id="task")

    try:
        links.publishing(send, wait=False)
        links.flush()
        stale = links.current()
        proxy.cut()  # the link's connection is closed while it is idle
        time.sleep(QUIET_SECONDS + 0.2)
        links.publishing(send, wait=False)
        assert links.current() not in (None, stale)  # found out during the publish
        links.flush()
        _, waiting, _ = direct.default_channel.queue_declare(queue=queue, passive=True)
        assert waiting == 2
        assert links.take_unsent() == []
    finally:
        links.close()
        direct.default_channel.queue_delete(queue)
        direct.release()


@pytest.mark.parametrize("ended", [True, False], ids=["a-thread-that-ended", "its-own-thread"])
def test_a_queue_refused_when_returned_tasks_are_sent_again_fails_only_those_tasks(
    app: App,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    ended: bool,
) -> None:
    """A task was sent to a queue deleted meanwhile, and RabbitMQ's return was not read
    before someone else declared the queue with other properties. The flush that reads
    it revokes that task and names the queue in the log. When a thread that ended had
    sent it, the thread that takes it over keeps its own connection."""
    monkeypatch.setattr(amqp_links, "QUIET_SECONDS", 3600.0)  # the return stays unread
    caplog.set_level(logging.ERROR, logger="nbtask")
    ledger = tmp_path / "ledger"
    queue = f"{settings.key_prefix}:q:{settings.default_queue}"
    app.send_task(RECORD_ID, (str(ledger),))
    app.flush()
    before = sending_link(app)
    returned: list[TaskHandle] = []
    direct = kombu.Connection(AMQP_URL)

    def run() -> None:
        app.send_task(RECORD_ID, (str(ledger),))  # declares the queue on this thread's link
        app.flush()
        direct.default_channel.queue_delete(queue)
        returned.append(app.send_task(RECORD_ID, (str(ledger),)))  # RabbitMQ returns it

    if ended:
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
    else:
        run()
    try:
        direct.default_channel.queue_declare(queue=queue, durable=False, auto_delete=False)
        app.flush()
        assert (sending_link(app) is before) is ended  # its own: RabbitMQ closed its channel
        with pytest.raises(TaskRevoked, match="not confirmed by the broker"):
            returned[0].get(timeout=5)
        assert any(f"cannot use the queue {queue!r}" in r.getMessage() for r in caplog.records)
        kept = sending_link(app)
        app.send_task(RECORD_ID, (str(ledger),), queue="elsewhere")
        app.flush()  # confirmed on the same connection
        assert sending_link(app) is kept and kept.confirms.unconfirmed == {}
    finally:
        direct.default_channel.queue_delete(queue)
        direct.release()
