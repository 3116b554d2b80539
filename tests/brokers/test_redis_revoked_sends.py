"""Sends Redis never confirmed are revoked, not left PENDING: Redis could not be reached, a
thread that sent them ended or was still alive when the app closed, Redis answered with an
error, or Redis was full. Their handles fail saying the send was not confirmed.

The client reaches Redis through a :class:`~tcp_proxy.TcpProxy` where a test needs to lose
its replies (``deafen()``, ``hold()``) or the connection (``refuse()``); workers reach Redis
directly. How unconfirmed sends are sent again is in ``test_redis_pipelined_sends.py``.
"""

from __future__ import annotations

import logging
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import RECORD_ID, wait_until
from pipelined import link_of, transport_of
from private_redis import PrivateRedis
from tcp_proxy import TcpProxy, proxying, via

from nbtask import App, Settings, State
from nbtask.errors import BrokerUnavailable, TaskRevoked


def test_sends_redis_cannot_be_reached_for_are_revoked_and_their_handles_fail(
    client: App, proxy: TcpProxy, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    client.send_task(RECORD_ID, (str(ledger),))
    client.flush()
    proxy.deafen()
    handles = [client.send_task(RECORD_ID, (str(ledger),)) for _ in range(5)]
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


def test_unanswered_sends_of_a_thread_that_ended_are_revoked_when_the_app_closes(
    app: App, client: App, proxy: TcpProxy, tmp_path: Path
) -> None:
    """Two threads sent tasks without waiting and ended; Redis took them and never
    answered. ``app.close()`` reads what each thread owes, and the tasks, in doubt, are
    revoked: their handles say the send was not confirmed and to send it again, as those
    of a live thread's unanswered sends do (they ended as closed, their records left
    PENDING; the second thread's were not even read)."""
    ledger = tmp_path / "ledger"
    confirmed: list[Any] = []
    lost: list[Any] = []
    connected, held = threading.Barrier(3), threading.Event()

    def sender() -> None:
        confirmed.append(client.send_task(RECORD_ID, (str(ledger),)))  # its own connection
        client.flush()
        connected.wait(30)
        assert held.wait(30)  # the publishes below never reach Redis, nor an answer them
        lost.extend(client.send_task(RECORD_ID, (str(ledger),)) for _ in range(2))

    threads = [threading.Thread(target=sender) for _ in range(2)]
    for thread in threads:
        thread.start()
    connected.wait(30)
    proxy.hold()
    held.set()
    for thread in threads:
        thread.join()
    assert len(confirmed) == 2 and len(lost) == 4
    client.close()
    for handle in lost:
        with pytest.raises(TaskRevoked, match="not confirmed by the broker before the app closed"):
            handle.get(timeout=5)
    assert [app.store.get_record(h.id).state for h in lost] == [State.REVOKED] * 4
    assert [app.store.get_record(h.id).state for h in confirmed] == [State.PENDING] * 2


@pytest.mark.brokers("amqp")
def test_unanswered_record_writes_of_a_live_thread_are_revoked_when_the_app_closes(
    app: App, settings: Settings, tmp_path: Path
) -> None:
    """On RabbitMQ, a lone ``delay()`` writes its task's PENDING record to the store
    without waiting for Redis's reply. A thread still alive at ``app.close()`` sent tasks
    whose records Redis never answered for: close revokes them (their messages did reach
    RabbitMQ), and their handles fail saying so, rather than stay PENDING."""
    ledger = tmp_path / "ledger"
    handles: list[Any] = []
    sent, finish = threading.Event(), threading.Event()
    with proxying(settings.result_url or "", 6379) as proxy:
        url = via(settings.result_url or "", proxy.url_port)
        client = App("closing", settings=settings.replace(result_url=url))

        def run() -> None:
            handles.append(client.send_task(RECORD_ID, (str(ledger),)))  # its own connections
            client.flush()
            proxy.hold()  # the record writes below never reach Redis
            handles.extend(client.send_task(RECORD_ID, (str(ledger),)) for _ in range(3))
            sent.set()
            finish.wait(60)  # alive and idle while the app closes

        thread = threading.Thread(target=run)
        thread.start()
        try:
            assert sent.wait(15)
            client.close()
        finally:
            finish.set()
            thread.join()
    first, *lost = handles
    for handle in lost:
        with pytest.raises(TaskRevoked, match="not confirmed by the broker before the app closed"):
            handle.get(timeout=5)
    assert [app.store.get_record(h.id).state for h in lost] == [State.REVOKED] * 3
    assert app.store.get_record(first.id).state is State.PENDING


def test_a_send_redis_answers_with_an_error_is_revoked_not_dropped(
    app: App, settings: Settings, r: redis.Redis, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    app.send_task(RECORD_ID, (str(ledger),), queue="other")
    app.flush()
    # The queue's stream replaced by another type: Redis answers the publish with an error.
    queue_key = transport_of(app).queue_key("other")
    r.delete(queue_key)
    r.set(queue_key, "not a stream")
    handle = app.send_task(RECORD_ID, (str(ledger),), queue="other")
    assert link_of(app).owed == 1
    with caplog.at_level(logging.ERROR):
        app.flush()  # an error reply is not an outage: the call returns, the error is logged
    assert link_of(app).owed == 0
    assert any("WRONGTYPE" in r.getMessage() for r in caplog.records)
    with pytest.raises(TaskRevoked, match="not confirmed by the broker"):
        handle.get(timeout=5)
    wait_until(
        lambda: app.store.get_record(handle.id).state is State.REVOKED, 5, "the record revoked"
    )


def test_sends_a_full_redis_refuses_are_revoked_and_their_handles_fail(
    private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    app = App("full", broker=private_redis.url, secret="full-secret")
    admin = redis.Redis.from_url(private_redis.url)
    try:
        app.send_task(RECORD_ID, (str(ledger),))
        app.flush()
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)  # every write is refused: out of memory
        handles = [app.send_task(RECORD_ID, (str(ledger),)) for _ in range(3)]
        assert link_of(app).owed == 3
        # Redis refuses each publish, then the revoke too: the handles fail all the same,
        # and the log says why, and what to do.
        with caplog.at_level(logging.ERROR):
            app.flush()
        for handle in handles:
            with pytest.raises(TaskRevoked, match="not confirmed by the broker"):
                handle.get(timeout=5)
        messages = [r.getMessage() for r in caplog.records]
        assert any("is full" in m and "maxmemory" in m for m in messages), messages
        # A send that waits for Redis's answer says so at once.
        with pytest.raises(BrokerUnavailable, match=r"is full.*maxmemory"):
            app.send_task(RECORD_ID, (str(ledger),), task_id=uuid.uuid4().hex)
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()
        app.close()
