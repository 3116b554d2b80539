"""Events a client on AMQP reads twice, from its reply queue and from its stream's catch-up.

A worker keeps each event on the client's stream, then publishes it to the client's reply
queue. A client that (re)declares its queue reads the stream from where its last catch-up
stopped; live messages carry no stream position, so the two overlap:

* an event kept before the catch-up read and published after the queue's consumer began
  comes both ways;
* after a reconnect, the catch-up reads again every event kept since the last catch-up,
  those the client received live meanwhile included.

:class:`Overlap` hands each such event over once. It knows events by their bytes (a
signed event is unique to its task, run and number; a copy sent again is the same event),
and only across the two ways: a message published again to the queue (a replay, or a
worker's sending again of an outcome) is handed over as often as it comes, and the handle
it is for says what it makes of it; only the first copy of an event the last catch-up read
goes (it is that event's live copy, or the client has the event already). Whether a live
copy will come cannot be known (one published before the queue was there never does), so
a copy put on the queue later of an event read by the catch-up alone is dropped without
the handle's log line. Exact would need the stream position in each published event.
"""

from __future__ import annotations

import collections
import hashlib

from nbtask.brokers.redis_channels import CHANNEL_MAXLEN

__all__ = ["Overlap"]


def _digest(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=16).digest()


class Overlap:
    """What one client channel's catch-up and its live reads both brought since the last one."""

    def __init__(self) -> None:
        # Digests of events' bytes, never the bytes: a client may follow large events.
        # Read by the last catch-up, not yet come live (one copy each: one live copy goes).
        self._caught_up: collections.Counter[bytes] = collections.Counter()
        # Received live since the last catch-up: the next one reads them again. The stream
        # keeps about CHANNEL_MAXLEN events: older ones are no longer read by a catch-up.
        self._live: collections.deque[bytes] = collections.deque(maxlen=CHANNEL_MAXLEN)
        self._live_counts: collections.Counter[bytes] = collections.Counter()

    def caught_up(self, entries: list[bytes]) -> list[bool]:
        """Note a catch-up's events (in order): for each, whether it is new here.

        One received live since the last catch-up is not new. What is new is then
        expected live too, once at most.
        """
        live, self._live_counts = self._live_counts, collections.Counter()
        self._live.clear()
        self._caught_up = collections.Counter()
        new = []
        for raw in entries:
            digest = _digest(raw)
            if live[digest] > 0:
                live[digest] -= 1
                new.append(False)
            else:
                self._caught_up[digest] += 1
                new.append(True)
        return new

    def received(self, raw: bytes) -> bool:
        """Note a message of the reply queue: whether it is new (not read by the catch-up)."""
        if not raw:
            return True  # a wake-up, never kept on the stream
        digest = _digest(raw)
        if self._caught_up[digest] > 0:
            self._caught_up[digest] -= 1
            if not self._caught_up[digest]:
                del self._caught_up[digest]
            return False
        if len(self._live) == self._live.maxlen:
            oldest = self._live[0]
            self._live_counts[oldest] -= 1
            if not self._live_counts[oldest]:
                del self._live_counts[oldest]
        self._live.append(digest)
        self._live_counts[digest] += 1
        return True
