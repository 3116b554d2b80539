"""Which run of a Redis server answers: a restart is seen as each connection is made.

A Redis that restarts without persistence comes back empty, and a client whose connection
is made again at once (an idle one found closed, a process stopped across the restart)
sees no outage. Each run of a server has its own ``run_id`` (``INFO server``): read as a
connection is made, a new one says the server restarted since this process last connected.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import ResponseError

from nbtask._text import redact_url

__all__ = ["ServerRuns"]

log = logging.getLogger("nbtask.brokers.redis_link")


class ServerRuns:
    """Counts the restarts of one Redis server seen by a link's connections.

    Its :meth:`connected` is redis-py's ``redis_connect_func``: it runs once per new
    connection (one round trip more, on a path that already makes several).
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._run_id: bytes | None = None
        self._asks = True  # False once INFO is refused (an ACL without it): none seen
        #: How many times a connection found a server run other than the one before.
        self.restarts = 0

    def connected(self, connection: Any) -> None:
        """Set up a new ``connection`` as redis-py does, then read the server's run id."""
        connection.on_connect()
        if not self._asks:
            return
        connection.send_command("INFO", "server")
        try:
            reply = connection.read_response()
        except ResponseError:
            self._asks = False
            return
        run_id = _run_id(reply)
        if run_id is None:
            return
        # No lock (a process may fork while another thread connects): two threads that
        # find the same restart at once may count it twice, and a count that changed is
        # all that is read.
        before, self._run_id = self._run_id, run_id
        if before is None or before == run_id:
            return
        self.restarts += 1
        log.warning(
            "the Redis server at %s restarted (a new run id): what it did not persist is gone",
            redact_url(self._url),
        )


def _run_id(reply: Any) -> bytes | None:
    """The ``run_id`` field of an ``INFO server`` reply, if it has one."""
    text = reply if isinstance(reply, bytes) else str(reply).encode()
    for line in text.splitlines():
        if line.startswith(b"run_id:"):
            return line[len(b"run_id:") :].strip()
    return None
