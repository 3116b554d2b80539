"""The reply reader of the Redis connections (:mod:`nbtask.brokers.redis_resp`), on the real Redis.

Replies are read straight from the socket into redis-py's hiredis reader, waiting with a
poll object kept on the connection (one per socket, not one per reply). The reader reads
private fields of redis-py's parser: with a redis-py whose parser lacks them, replies are
read by redis-py instead; with the one installed, by the reader.
"""

from __future__ import annotations

import inspect
import re
import textwrap
from typing import Any

import pytest
import redis
import redis._parsers.hiredis as redis_hiredis
from redis.exceptions import ResponseError

from nbtask.brokers import redis_resp
from nbtask.brokers.redis_link import RedisLink


def kept_poll(connection: Any) -> tuple[int, int, Any]:
    """What ``connection`` keeps for its replies' waits: (descriptor, process, poll object)."""
    kept: tuple[int, int, Any] = getattr(connection, redis_resp._POLL)
    return kept


def test_a_connection_waits_for_all_its_replies_on_one_poll_object(redis_url: str) -> None:
    link = RedisLink(redis_url, "broker")
    try:
        assert link.run([("PING",)]) == [b"PONG"]
        connection = link._connection()
        fd, _, poller = kept_poll(connection)
        assert fd == connection._sock.fileno()
        for _ in range(3):
            assert link.run([("PING",), ("ECHO", "x")]) == [b"PONG", b"x"]
        assert kept_poll(connection)[2] is poller
    finally:
        link.close()


def test_a_connection_made_anew_on_another_descriptor_waits_on_that_one(redis_url: str) -> None:
    """The old socket is kept open (its descriptor taken), so the new one has another: a
    poll object kept for the old one would wait on a socket that never answers."""
    link = RedisLink(redis_url, "broker")
    old = None
    try:
        assert link.run([("PING",)]) == [b"PONG"]
        connection = link._connection()
        old, connection._sock = connection._sock, None  # dropped; the next run connects
        assert link.run([("PING",)]) == [b"PONG"]
        new = connection._sock.fileno()
        assert new != old.fileno()
        assert kept_poll(connection)[0] == new
    finally:
        if old is not None:
            old.close()
        link.close()


def renamed_parser() -> type:
    """redis-py's hiredis parser as a release that renamed its reader and buffer would have
    it: its own code, with ``_reader`` and ``_buffer`` called otherwise."""
    source = textwrap.dedent(inspect.getsource(redis_hiredis._HiredisParser))
    source = re.sub(r"\b_reader\b", "_hiredis_reader", source)
    source = re.sub(r"\b_buffer\b", "_read_buffer", source)
    namespace = dict(vars(redis_hiredis))
    exec(source, namespace)
    parser: type = namespace["_HiredisParser"]
    return parser


def reads_by_redis_py(connection: Any) -> list[int]:
    """Count the replies redis-py reads on ``connection`` (its ``read_response`` calls)."""
    counted: list[int] = []
    read_response = connection.read_response

    def counting(*args: Any, **kwargs: Any) -> Any:
        counted.append(1)
        return read_response(*args, **kwargs)

    connection.read_response = counting
    return counted


def test_with_a_redis_py_whose_parser_lacks_the_fields_redis_py_reads_the_replies(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    parser = renamed_parser()
    assert not hasattr(parser(65536), "_buffer")
    # As if this redis-py's were that one, and no connection had told yet.
    monkeypatch.setattr(redis_resp, "_HiredisParser", parser)
    monkeypatch.setattr(redis_resp, "_fitting", [None], raising=False)
    link = RedisLink(redis_url, "broker")
    kwargs = link._redis.connection_pool.connection_kwargs
    monkeypatch.setitem(kwargs, "parser_class", parser)
    try:
        connection = link._connection()
        assert connection._parser.__class__ is parser
        assert link.run([("PING",)]) == [b"PONG"]  # connected: its parser told
        read = reads_by_redis_py(connection)
        key = f"{prefix}:renamed"
        replies = link.run(
            [("SET", key, "v"), ("GET", key), ("INCR", key), ("DEL", key)], raise_errors=False
        )
        assert replies[:2] == [b"OK", b"v"] and replies[3] == 1
        assert isinstance(replies[2], ResponseError)  # an error reply, in its place
        assert link.run([("XREAD", "BLOCK", "50", "STREAMS", key, "$")], block_seconds=0.05) == [
            None
        ]
        assert len(read) == 5
    finally:
        link.close()
    assert redis_resp._fitting == [False]


def test_with_the_installed_redis_py_the_replies_are_read_by_nbtask(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The look at redis-py's fields passes with the redis-py installed: the reader is used."""
    assert redis_resp._HiredisParser is redis_hiredis._HiredisParser, redis.__version__
    monkeypatch.setattr(redis_resp, "_fitting", [None])  # no connection told yet
    link = RedisLink(redis_url, "broker")
    try:
        assert link.run([("PING",)]) == [b"PONG"]
        assert redis_resp._fitting == [True], redis.__version__
        connection = link._connection()
        read = reads_by_redis_py(connection)
        key = f"{prefix}:installed"
        assert link.run([("SET", key, "v"), ("GET", key), ("DEL", key)]) == [b"OK", b"v", 1]
        assert read == []  # none by redis-py
    finally:
        link.close()
