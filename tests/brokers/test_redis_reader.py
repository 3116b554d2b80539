"""The reply reader of the Redis connections (:mod:`nbtask.brokers.redis_resp`), on the real Redis.

Replies are read straight from the socket into redis-py's hiredis reader, waiting with a
poll object kept on the connection (one per socket, not one per reply).
"""

from __future__ import annotations

from typing import Any

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
