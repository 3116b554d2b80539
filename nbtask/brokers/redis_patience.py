"""How long a thread waits for Redis's answers in a bounded block, and when it gave up.

A block (:meth:`~nbtask.brokers.redis_link.RedisLink.answering_within`) bounds the waits
of what must end even when Redis takes what is sent but says nothing back: a stopping
worker, a client's wait with a timeout. Once one answer was given up on, the block's
commands of the next ``seconds`` fail at once: a server that does not answer costs one
wait per ``seconds``, not one per command, and one that answers again is found again.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from nbtask.brokers.redis_errors import REFUSED_AT_ONCE

__all__ = ["Patience"]


class Patience:
    """Per thread: the seconds of its bounded block (if in one), and when it gave up.

    Parameters
    ----------
    base
        The link's redis-py client: bounded clients copy its connection settings.
    """

    def __init__(self, base: Any) -> None:
        self._base = base
        self._local = threading.local()
        self._clients: dict[float, Any] = {}  # by seconds: pooled connections that wait so long
        self._lock = threading.Lock()

    @property
    def seconds(self) -> float | None:
        """How long this thread waits for an answer in its block; ``None`` outside one."""
        seconds: float | None = getattr(self._local, "seconds", None)
        return seconds

    def begin(self, seconds: float) -> tuple[float | None, float]:
        """Enter a block of this thread's, nothing given up yet; returns what :meth:`end` takes."""
        outer = (self.seconds, getattr(self._local, "until", 0.0))
        self._local.seconds, self._local.until = seconds, 0.0
        return outer

    def end(self, outer: tuple[float | None, float]) -> None:
        """Leave the block :meth:`begin` entered: the one around it (if any) holds again."""
        self._local.seconds, self._local.until = outer

    def give_up(self) -> None:
        """Note an answer given up on: the block's commands fail at once for its seconds."""
        self._local.until = time.monotonic() + (self.seconds or 0.0)

    def refuse_if_silent(self) -> None:
        """Raise redis-py's ``TimeoutError`` while an answer was given up on just now."""
        if time.monotonic() < getattr(self._local, "until", 0.0):
            raise RedisTimeoutError(REFUSED_AT_ONCE)

    def client(self, seconds: float) -> Any:
        """A redis-py client on pooled connections that wait ``seconds`` for an answer."""
        with self._lock:
            client = self._clients.get(seconds)
            if client is None:
                base = self._base.connection_pool
                kwargs = {**base.connection_kwargs, "socket_timeout": seconds}
                # The base's class too: a unix socket's (the embedded cluster's) is another.
                pool = redis.ConnectionPool(connection_class=base.connection_class, **kwargs)
                client = redis.Redis(connection_pool=pool)
                self._clients[seconds] = client
            return client

    def pooled(self) -> list[Any]:
        """The pooled connections of the base client and the bounded ones (for forks).

        Read without the lock: in a fork no other thread exists, and one may have held it.
        """
        pools = [self._base.connection_pool]
        pools += [client.connection_pool for client in list(self._clients.values())]
        return [
            connection
            for pool in pools
            for kind in ("_available_connections", "_in_use_connections")
            for connection in list(getattr(pool, kind, ()))
        ]

    def close(self) -> None:
        """Close the bounded clients' connections."""
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()
            client.connection_pool.disconnect()
