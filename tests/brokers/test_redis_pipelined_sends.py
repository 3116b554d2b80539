"""A lone ``delay()`` does not wait for Redis's reply, and loses no task for it.

On the Redis broker the reply is the publish's; on RabbitMQ, the store's to the task's
PENDING record (RabbitMQ's confirms are tested in ``test_amqp_confirms.py``).

The publish is written to the thread's connection and its reply read later (by the
thread's next command, ``get()``, ``app.flush()`` or ``app.close()``), as RabbitMQ's
confirms are. These tests check the ways such a reply can go missing: the connection
drops with replies unread (sent again; a copy that got through is refused by the publish
script, so each task runs once), Redis cannot be reached to send them again (revoked,
their handles fail), Redis lost its scripts (sent again), and Redis answers with an error
(reported, not dropped).

The client reaches Redis through a :class:`~tcp_proxy.TcpProxy`; ``deafen()`` makes it
lose every reply on the way back while its commands still reach Redis. Workers reach
Redis directly.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
from helpers import wait_until
from tcp_proxy import TcpProxy

from nbtask import App, Settings, State
from nbtask.brokers.redis_link import OWED_BYTES, RedisLink
from nbtask.brokers.redis_store import RedisStore
from nbtask.brokers.redis_streams import StreamsTransport
from nbtask.errors import BrokerUnavailable, TaskRevoked

RECORD = "tests.sample_tasks.record_id"  # appends its id to a file: counts runs


@pytest.fixture
def proxy(settings: Settings) -> Iterator[TcpProxy]:
    """A proxy in front of Redis for the test's client."""
    target = urlsplit(settings.broker_url)
    opened = TcpProxy(target.hostname or "127.0.0.1", target.port or 6379)
    opened.start()
    yield opened
    opened.stop()


@pytest.fixture
def client(settings: Settings, proxy: TcpProxy) -> Iterator[App]:
    """A client app whose Redis connections go through ``proxy``."""
    url = urlsplit(settings.broker_url)._replace(netloc=f"127.0.0.1:{proxy.url_port}").geturl()
    application = App("pipelined", settings=settings.replace(broker_url=url))
    yield application
    application.close()


def transport_of(app: App) -> StreamsTransport:
    transport = app.transport
    assert isinstance(transport, StreamsTransport)
    return transport


def link_of(app: App) -> RedisLink:
    """The link of the Redis the client writes its tasks' records to (on both brokers)."""
    store = app.transport.store
    assert isinstance(store, RedisStore)
    return store.link


def runs(ledger: Path) -> collections.Counter[str]:
    """How many times each task id ran."""
    return collections.Counter(ledger.read_text().split() if ledger.exists() else [])


@pytest.mark.brokers()
def test_a_loop_of_delay_does_not_wait_for_each_reply_and_each_task_runs_once(
    app: App, start_worker, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    first = app.send_task(RECORD, (str(ledger),))  # connects: a first send waits
    handles = [app.send_task(RECORD, (str(ledger),)) for _ in range(50)]
    assert link_of(app).owed == 50  # each returned once written
    app.flush()
    assert link_of(app).owed == 0
    start_worker(concurrency=2)
    everything = [first, *handles]
    assert [h.get(timeout=30) for h in everything] == [h.id for h in everything]
    assert runs(ledger) == {h.id: 1 for h in everything}


def test_replies_lost_with_their_connection_are_sent_again_and_each_task_runs_once(
    client: App, proxy: TcpProxy, start_worker, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    first = client.send_task(RECORD, (str(ledger),))
    client.flush()
    proxy.deafen()  # commands still reach Redis; its replies never come back
    handles = [client.send_task(RECORD, (str(ledger),)) for _ in range(20)]
    assert link_of(client).owed == 20
    proxy.cut()

    client.flush()  # sends all 20 again on a new connection: Redis refuses each copy
    assert link_of(client).owed == 0
    assert client.transport.take_unsent() == []
    start_worker(concurrency=2)
    everything = [first, *handles]
    assert [h.get(timeout=30) for h in everything] == [h.id for h in everything]
    assert runs(ledger) == {h.id: 1 for h in everything}


def test_sends_redis_cannot_be_reached_for_are_revoked_and_their_handles_fail(
    client: App, proxy: TcpProxy, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    client.send_task(RECORD, (str(ledger),))
    client.flush()
    proxy.deafen()
    handles = [client.send_task(RECORD, (str(ledger),)) for _ in range(5)]
    proxy.refuse()  # the connection drops and Redis cannot be reached again

    with caplog.at_level(logging.ERROR), pytest.raises(BrokerUnavailable, match="cannot reach"):
        client.flush()
    for handle in handles:
        with pytest.raises(TaskRevoked, match="not confirmed by the broker") as info:
            handle.get(timeout=5)
        assert handle.id in str(info.value)
    # The store is the same Redis: the log says the tasks may still run if they got there.
    assert any("may still run" in r.getMessage() for r in caplog.records)
    assert client.transport.take_unsent() == []  # each was reported once


@pytest.mark.brokers()
def test_a_server_that_lost_its_scripts_still_queues_the_sends_it_refused(
    app: App, start_worker, settings: Settings, r: redis.Redis, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    first = app.send_task(RECORD, (str(ledger),))
    app.flush()
    r.script_flush()  # as after a restart of a server without persistence
    handles = [app.send_task(RECORD, (str(ledger),)) for _ in range(5)]  # each NOSCRIPT
    app.flush()
    assert app.transport.take_unsent() == []
    start_worker(concurrency=2)
    everything = [first, *handles]
    assert [h.get(timeout=30) for h in everything] == [h.id for h in everything]
    assert runs(ledger) == {h.id: 1 for h in everything}


def test_a_send_redis_answers_with_an_error_is_revoked_not_dropped(
    app: App, settings: Settings, r: redis.Redis, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    app.send_task(RECORD, (str(ledger),), queue="other")
    app.flush()
    # The queue's stream replaced by another type: Redis answers the publish with an error.
    queue_key = transport_of(app).queue_key("other")
    r.delete(queue_key)
    r.set(queue_key, "not a stream")
    handle = app.send_task(RECORD, (str(ledger),), queue="other")
    assert link_of(app).owed == 1
    with caplog.at_level(logging.ERROR):
        app.flush()
    with pytest.raises(TaskRevoked, match="not confirmed by the broker"):
        handle.get(timeout=5)
    assert any("WRONGTYPE" in r.getMessage() for r in caplog.records)
    wait_until(
        lambda: app.store.get_record(handle.id).state is State.REVOKED, 5, "the record revoked"
    )


def test_a_loop_sending_large_arguments_keeps_few_of_them_unanswered(app: App) -> None:
    @app.task
    def size(data: bytes) -> int:
        return len(data)

    payload = b"x" * 600_000  # inline (under the blob threshold), under LARGE_BYTES
    most = 0
    handles = []
    for _ in range(60):
        handles.append(size.delay(payload))
        most = max(most, link_of(app).owed)
    # Kept to be sent again, the unanswered publishes stay near OWED_BYTES, not 60 x 600 kB.
    assert 1 < most <= OWED_BYTES // len(payload) + 1
    app.flush()
    assert link_of(app).owed == 0
