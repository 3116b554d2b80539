"""Events a client on AMQP reads twice, from its reply queue and from its stream's catch-up.

A worker keeps each event on the client's stream, then publishes it to the client's reply
queue with the id it was kept under beside it (:data:`~.amqp_guards.ENTRY_HEADER`). A
client that (re)declares its queue reads the stream from a position, and the two overlap:

* an event kept before the catch-up read and published after the queue's consumer began
  comes both ways;
* after a reconnect, the catch-up reads again the events received live shortly before the
  connection went (see below).

:class:`Overlap` hands each such event over once. It knows events by their bytes (a
signed event is unique to its task, run and number; a copy sent again is the same event),
and only across the two ways: a message published again to the queue (a replay, or a
worker's sending again of an outcome) is handed over as often as it comes, and the handle
it is for says what it makes of it; only the first copy of an event the last catch-up read
goes (it is that event's live copy, or the client has the event already). Whether a live
copy will come cannot be known (one published before the queue was there never does), so
a copy put on the queue later of an event read by the catch-up alone is dropped without
the handle's log line.

Where a catch-up starts: after the last catch-up, or later, from the newest position that
came live beside an event, less :data:`MARGIN_MS` of the stream's time. The position is
unsigned (anyone who can publish to RabbitMQ sets it) and only a hint: it counts once the
reader says its event verified (:meth:`Overlap.verified`), and at the catch-up only if the
stream holds that very event under it (so a genuine event published again beside a
position of someone's choosing moves nothing); else the catch-up starts after the last
one, as without positions (an older worker sends none). The margin covers publishers
racing: RabbitMQ orders messages per connection only, so an event kept just before the
one received last may still be on its way; what was received already is handed over once.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Callable

from nbtask.brokers.redis_channels import CHANNEL_MAXLEN, READ_COUNT, entry_key

__all__ = ["MARGIN_MS", "Overlap"]

#: How far (stream time, milliseconds) before the newest event received live a catch-up
#: starts: another worker's event kept earlier may be published later (a few ms apart,
#: as a rule). More than :data:`~.redis_channels.CHANNEL_MAXLEN` events kept within it
#: before a connection drops may be said trimmed, and taken from their tasks' records.
MARGIN_MS = 2_000
#: Live messages with a position kept until the reader says whether they verified: those
#: of the last reads (a read hands over :data:`~.redis_channels.READ_COUNT` at most).
_OFFERED = 2 * READ_COUNT


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
        # Live messages with a position beside them, by the id each was handed over as:
        # (position, digest), until the reader says whether it verified.
        self._offered: collections.OrderedDict[str, tuple[str, bytes]] = collections.OrderedDict()
        # The newest position beside a verified event since the last catch-up, its digest.
        self._heard: tuple[tuple[int, int], str, bytes] | None = None

    def verified(self, handed_as: str) -> None:
        """The event handed over as ``handed_as`` verified: its position counts (if it had one)."""
        offered = self._offered.pop(handed_as, None)
        if offered is None:
            return
        entry, digest = offered
        key = entry_key(entry)
        if key is not None and (self._heard is None or key > self._heard[0]):
            self._heard = (key, entry, digest)

    def catch_up_from(self, after: str, kept_at: Callable[[str], bytes | None]) -> str:
        """Where the next catch-up starts: ``after`` (the last one's end), or later.

        Later only from a position that came beside a verified event, and that
        ``kept_at`` (the event the stream holds under an id) says holds that event.
        """
        heard, self._heard = self._heard, None
        self._offered.clear()
        last = entry_key(after)
        if heard is None or last is None or heard[0] <= last:
            return after
        (millis, _), entry, digest = heard
        kept = kept_at(entry)
        if kept is None or _digest(kept) != digest:
            return after
        start = (max(millis - MARGIN_MS, 0), 0)
        return f"{start[0]}-{start[1]}" if start > last else after

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

    def received(self, raw: bytes, handed_as: str, entry: str) -> bool:
        """Note a message of the reply queue: whether it is new (not read by the catch-up).

        A new one is handed over as ``handed_as``, with ``entry`` beside it (the position
        it was kept under, ``''`` for none): counted once it verified (:meth:`verified`).
        """
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
        if entry:
            self._offered[handed_as] = (entry, digest)
            if len(self._offered) > _OFFERED:
                self._offered.popitem(last=False)
        return True
