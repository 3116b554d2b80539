"""Commands are written before the sending thread lets go of the GIL, and none is lost for it.

A send writes straight to the socket, then looks whether the server closed the connection
meanwhile (:func:`~nbtask.brokers.redis_resp.send_first`,
:meth:`~nbtask.brokers.redis_link.RedisLink.send_unanswered`). These check the two ways
that order could lose a command: a connection Redis closed while it was idle (the
command written into it is sent again, as a call, once), and a write bigger than the
socket's buffer (the rest follows in order).
"""

from __future__ import annotations

import select
import types
from pathlib import Path

import pytest
import redis
from helpers import RECORD_ID, ledger_runs
from pipelined import link_of

from nbtask import App
from nbtask.brokers import redis_resp
from nbtask.brokers.redis_link import RedisLink
from nbtask.brokers.redis_resp import closed_by_server, send_first


def kill_this_threads_connection(link: RedisLink, r: redis.Redis) -> None:
    """Have Redis close the calling thread's connection of ``link``, as a restart would."""
    sock = link._connection()._sock
    assert sock is not None
    host, port = sock.getsockname()[:2]
    assert r.client_kill(f"{host}:{port}")


@pytest.mark.brokers("redis")
def test_a_delay_on_a_connection_redis_closed_while_idle_runs_once(
    app: App, r: redis.Redis, start_worker, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    first = app.send_task(RECORD_ID, (str(ledger),))
    app.flush()  # its reply read: nothing owed on the connection Redis then closes
    link = link_of(app)
    kill_this_threads_connection(link, r)

    again = app.send_task(RECORD_ID, (str(ledger),))  # written into the closed connection
    assert link.owed == 0  # seen closed at once, and sent as a call on a new connection
    assert app.transport.take_unsent() == []
    start_worker(concurrency=1)
    assert [h.get(timeout=30) for h in (first, again)] == [first.id, again.id]
    assert ledger_runs(ledger) == {first.id: 1, again.id: 1}


def test_a_write_bigger_than_the_sockets_buffer_goes_whole_and_in_order(
    r: redis.Redis, redis_url: str, prefix: str
) -> None:
    link = RedisLink(redis_url, "broker")
    try:
        assert link.run([("PING",)]) == [b"PONG"]  # connected: the next write is direct
        # Each value under the size sent apart, so the batch is one buffer of ~14 MB:
        # the first write takes what fits, sendall the rest.
        values = [bytes([i]) * 900_000 for i in range(16)]
        keys = [f"{prefix}:big:{i}" for i in range(16)]
        replies = link.run([("SET", k, v) for k, v in zip(keys, values, strict=True)])
        assert replies == [b"OK"] * 16
        assert r.mget(keys) == values
    finally:
        link.close()


@pytest.mark.parametrize("idempotent", [True, False])
def test_a_command_on_a_connection_redis_closed_while_idle_runs_once_on_a_new_one(
    r: redis.Redis, redis_url: str, prefix: str, idempotent: bool
) -> None:
    # Commands safe to run twice are sent without looking whether Redis closed the
    # connection first (they are sent again on a new one); the others are looked for.
    link = RedisLink(redis_url, "broker")
    key = f"{prefix}:runs"
    try:
        assert link.run([("INCR", key)]) == [1]
        closed = link._connection()._sock
        kill_this_threads_connection(link, r)
        command = ("INCRBY", key, "0") if idempotent else ("INCR", key)
        assert link.run([command, ("GET", key)], idempotent=idempotent)[1] == (
            b"1" if idempotent else b"2"
        )
        assert link._connection()._sock not in (None, closed)
        assert r.get(key) == (b"1" if idempotent else b"2")
        error = ("HGET", key, "field")  # (a string, not a hash): an error reply
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            link.run([error], idempotent=idempotent)
        assert link.run([error, ("GET", key)], raise_errors=False)[1] == r.get(key)
    finally:
        link.close()
        r.delete(key)


def test_the_look_for_a_closed_connection_reads_at_once_without_polling(
    r: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A connection with a timeout is non-blocking underneath: the look after each publish
    # is one read, whether nothing came, a reply came (kept in the parser, read later
    # without waiting) or the server closed the connection; never a poll before it.
    polls: list[object] = []

    def counted_poll() -> object:
        polls.append(None)
        return select.poll()

    counted = types.SimpleNamespace(poll=counted_poll, POLLIN=select.POLLIN)
    monkeypatch.setattr(redis_resp, "select", counted)
    link = RedisLink(redis_url, "broker")
    try:
        assert link.run([("PING",)]) == [b"PONG"]
        connection = link._connection()
        sock = connection._sock
        assert sock is not None and sock.gettimeout() is not None
        polls.clear()  # (the PING's own read waited for its reply)
        assert closed_by_server(connection) is False  # nothing came: open

        assert send_first(connection, [b"*1\r\n$4\r\nPING\r\n"])
        assert select.select([sock], [], [], 30)[0]  # the reply has come
        assert closed_by_server(connection) is False
        assert connection._parser._reader.gets() == b"PONG"  # read by the look itself

        kill_this_threads_connection(link, r)
        assert select.select([sock], [], [], 30)[0]  # the end of the connection has come
        assert closed_by_server(connection) is True
        assert polls == []
    finally:
        link.close()
