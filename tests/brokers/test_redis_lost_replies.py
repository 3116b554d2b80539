"""A command whose connection drops after Redis ran it, before its reply came, runs once.

Redis may run what it was sent and lose only the reply (the connection is killed, a proxy
or the network drops it): such a command is not sent again on a new connection, where a
copy would run twice (a task queued twice, a follow-up taken by no one). The call raises
instead, saying Redis may have run it. A connection Redis closed while it was idle is
still made anew at once: nothing had been sent on it.

The client reaches Redis through a :class:`~tcp_proxy.TcpProxy`: ``deafen()`` loses the
reply on its way back while the command reaches Redis, ``cut()`` then drops the
connection. Workers reach Redis directly.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis
from helpers import RECORD_ID, ledger_runs, wait_until
from tcp_proxy import TcpProxy, reply_lost_once, via

from nbtask import App, Settings
from nbtask.brokers.redis_errors import RepliesLost
from nbtask.brokers.redis_link import RedisLink
from nbtask.brokers.redis_streams import StreamsTransport
from nbtask.errors import BrokerUnavailable

pytestmark = pytest.mark.brokers("redis")


def test_a_command_redis_ran_is_not_sent_again_when_its_reply_is_lost(
    proxy: TcpProxy, settings: Settings, r: redis.Redis, prefix: str
) -> None:
    link = RedisLink(via(settings.broker_url or "", proxy.url_port), "broker")
    key = f"{prefix}:runs"
    try:
        assert link.run([("PING",)]) == [b"PONG"]  # connected and answered on
        with (
            reply_lost_once(proxy, lambda: r.get(key) is not None),
            pytest.raises(RepliesLost, match="Redis may have run it"),
        ):
            link.run([("INCR", key)])
        assert r.get(key) == b"1"  # (sent again, it ran twice)
        assert link.run([("INCR", key)]) == [2]  # the next command goes on a new connection
    finally:
        link.close()


def test_an_idempotent_command_whose_reply_is_lost_is_sent_once_more(
    proxy: TcpProxy, settings: Settings, r: redis.Redis, prefix: str
) -> None:
    # (A client's read of its event channel, a script load: running them twice is safe.)
    link = RedisLink(via(settings.broker_url or "", proxy.url_port), "broker")
    key = f"{prefix}:value"
    try:
        assert link.run([("PING",)]) == [b"PONG"]
        with reply_lost_once(proxy, lambda: r.get(key) is not None):
            assert link.run([("SET", key, "v")], idempotent=True) == [b"OK"]
    finally:
        link.close()


def test_a_connection_redis_closed_while_idle_is_made_anew_without_an_error(
    proxy: TcpProxy, settings: Settings, r: redis.Redis, prefix: str
) -> None:
    link = RedisLink(via(settings.broker_url or "", proxy.url_port), "broker")
    key = f"{prefix}:runs"
    try:
        assert link.run([("PING",)]) == [b"PONG"]
        proxy.cut()  # as a restart, CLIENT KILL or a server timeout would
        assert link.run([("INCR", key)]) == [1]
        assert r.get(key) == b"1"
    finally:
        link.close()


@pytest.mark.parametrize("size", [0, 2 << 20], ids=["small", "large"])
def test_a_send_whose_reply_was_lost_with_its_connection_is_queued_once(
    client: App,
    proxy: TcpProxy,
    settings: Settings,
    r: redis.Redis,
    start_worker,
    tmp_path: Path,
    size: int,
) -> None:
    ledger = tmp_path / "ledger"
    client.send_task(RECORD_ID, (str(ledger),))
    client.flush()  # this thread's connection is made and answered on
    transport = client.transport
    assert isinstance(transport, StreamsTransport)
    task_id = uuid.uuid4().hex
    record = transport.store.record_key(task_id)
    queue = transport.queue_key(settings.default_queue)
    # A send with its own id waits for Redis's answer; a large message (over 1 MiB, under
    # the blob threshold) is queued by a transaction, not by the publish script. Sent
    # again, the copy would be refused as a reused id (the send would say its own task
    # holds the id), and a large one queued a second time.
    with (
        reply_lost_once(proxy, lambda: r.exists(record) == 1),
        pytest.raises(BrokerUnavailable, match="Redis may have run it"),
    ):
        client.send_task(RECORD_ID, (str(ledger), "x" * size), task_id=task_id)
    entries = r.xrange(queue)
    assert [fields[b"i"].decode() for _, fields in entries].count(task_id) == 1
    start_worker(concurrency=2)
    assert client.handle(task_id).get(timeout=30) == task_id
    wait_until(lambda: len(ledger_runs(ledger)) == 2, 30, "both tasks to run")
    assert ledger_runs(ledger)[task_id] == 1
