"""Clients' event channels on Redis: the part of the result store that carries events.

``<key_prefix>:c:<client id>`` is a client's channel, a stream of signed events (``e``
fields; an empty entry only wakes a blocked reader), trimmed to :data:`CHANNEL_MAXLEN`,
kept while the client lives and ``result_ttl`` after.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from redis.exceptions import ResponseError

from nbtask.brokers.redis_errors import is_wrong_type
from nbtask.brokers.redis_link import RedisLink

__all__ = ["CHANNEL_MAXLEN", "RedisChannels", "event_of", "refuses_entries", "stream_id"]

log = logging.getLogger(__name__)

#: Events kept per client channel (older ones are trimmed).
CHANNEL_MAXLEN = 10_000


class RedisChannels:
    """The client channels of :class:`~nbtask.brokers.redis_store.RedisStore`."""

    link: RedisLink
    prefix: str
    ttl: int

    def channel_key(self, client_id: str) -> str:
        """The stream carrying events to one client."""
        return f"{self.prefix}:c:{client_id}"

    def is_channel(self, name: str) -> bool:
        """True if ``name`` is shaped like a client channel of this key prefix."""
        return _channel_name(self.channel_key("")).fullmatch(name) is not None

    def event_command(self, channel: str, raw: bytes) -> tuple[Any, ...]:
        """The command appending one event to a client's channel."""
        return ("XADD", channel, "MAXLEN", "~", CHANNEL_MAXLEN, "*", "e", raw)

    def append_events(self, channel: str, raw_events: Sequence[bytes]) -> None:
        """Append events to a client's channel, in one round trip."""
        self.append_replacing(channel, [self.event_command(channel, raw) for raw in raw_events])

    def append_replacing(
        self, stream: str, commands: list[tuple[Any, ...]], *, large: bool = False
    ) -> None:
        """Run ``commands``, which append to ``stream``, replacing it if Redis refuses.

        A stream Redis refuses an entry for (a key of another type, or a stream whose ids
        were used up by an entry put at the last one) was not written by nbtask, and
        nothing could be appended to it again (the store's scripts do the same for a
        client's channel: WRITE_FINAL). ``large``: as :meth:`RedisLink.run`'s.
        """
        with self.link.translate_errors():
            try:
                self.link.run(commands, large=large)
            except ResponseError as exc:
                if not refuses_entries(exc):
                    raise
                log.error("replaced %s, which nbtask did not write: %s", stream, exc)
                self.link.run([("DEL", stream), *commands], large=large)

    def read_events(
        self, channels: Mapping[str, str], block_seconds: float
    ) -> list[tuple[str, str, bytes]]:
        """Block on client channels ``{channel: after id}``; ``(channel, id, raw)`` triples."""
        block = max(1, int(block_seconds * 1000))
        command = ("XREAD", "COUNT", 500, "BLOCK", block, "STREAMS", *channels, *channels.values())
        with self.link.translate_errors():
            (reply,) = self.link.run([command], block_seconds=block_seconds)
        out: list[tuple[str, str, bytes]] = []
        for stream, entries in reply or ():
            name = stream.decode()
            for entry_id, fields in entries:
                out.append((name, entry_id.decode(), event_of(fields)))
        return out

    def events_after(self, channel: str, after: str) -> list[tuple[str, bytes]]:
        """``(id, raw)`` of the events on ``channel`` after entry ``after`` (``"0-0"``: all)."""
        start = f"({after}" if after != "0-0" else "-"
        with self.link.translate_errors():
            (entries,) = self.link.run([("XRANGE", channel, start, "+")])
        return [(entry_id.decode(), event_of(fields)) for entry_id, fields in entries]

    def channel_end(self, channel: str) -> str:
        """The id of the newest event on a channel (``"0-0"`` when empty)."""
        with self.link.translate_errors():
            (last,) = self.link.run([("XREVRANGE", channel, "+", "-", "COUNT", 1)])
        return str(last[0][0].decode()) if last else "0-0"

    def trimmed_after(self, channel: str, after: str) -> bool:
        """Whether events after entry ``after`` of ``channel`` may have been trimmed unread.

        A channel is trimmed only once it holds :data:`CHANNEL_MAXLEN` events (it keeps at
        least that many); then the events between ``after`` and the oldest one kept went.
        A channel that is gone, or not a stream, lost nothing this could tell.
        """
        with self.link.translate_errors():
            try:
                (info,) = self.link.run([("XINFO", "STREAM", channel)])
            except ResponseError:  # no such key, or another type
                return False
        fields = dict(zip(info[::2], info[1::2], strict=False)) if isinstance(info, list) else {}
        first, length = fields.get(b"first-entry"), fields.get(b"length")
        if not isinstance(length, int) or length < CHANNEL_MAXLEN or not first:
            return False
        return stream_id(first[0]) > stream_id(after.encode())

    def drop_event(self, channel: str, entry_id: str) -> None:
        """Delete one entry of a client's channel."""
        with self.link.translate_errors():
            self.link.run([("XDEL", channel, entry_id)])

    def replay(self, channel: str) -> list[bytes]:
        """Every event still kept on a client's channel, oldest first."""
        with self.link.translate_errors():
            try:
                (entries,) = self.link.run([("XRANGE", channel, "-", "+", "COUNT", CHANNEL_MAXLEN)])
            except ResponseError:  # not a stream (a record names any channel): none kept
                log.error("ignored %s: not a stream, not written by nbtask", channel)
                return []
        return [raw for _id, fields in entries if (raw := event_of(fields))]

    def wake(self, channel: str) -> None:
        """Append an empty entry so a reader blocked on ``channel`` returns.

        The channel expires as a live client's does: a client that closes before any
        event reached it would otherwise leave a stream that never goes.
        """
        self.append_replacing(
            channel, [self.event_command(channel, b""), ("EXPIRE", channel, self.ttl)]
        )

    def keep_channel(self, channel: str) -> None:
        """Push back the expiry of an event channel (its client is alive)."""
        with self.link.translate_errors():
            self.link.redis.expire(channel, self.ttl)


def refuses_entries(exc: BaseException) -> bool:
    """Whether Redis refused an entry for a stream nbtask did not write.

    A key of another type, or a stream whose ids were used up by an entry put at the last
    possible one.
    """
    return is_wrong_type(exc) or "last possible" in str(exc)


@functools.lru_cache(maxsize=8)
def _channel_name(prefix: str) -> re.Pattern[str]:
    return re.compile(re.escape(prefix) + r"[0-9a-f]{1,32}")


def stream_id(entry_id: bytes) -> tuple[int, int]:
    """A stream entry id (``b"<ms>-<seq>"``) as numbers, to compare ids; junk is ``(0, 0)``."""
    millis, _, seq = entry_id.partition(b"-")
    if not (millis.isdigit() and seq.isdigit()):
        return (0, 0)
    return (int(millis), int(seq))


def event_of(fields: Any) -> bytes:
    """The raw event of a stream entry's flat field list (``b""`` for a wake-up or junk).

    Also the control stream's entries, which are written the same way.
    """
    if isinstance(fields, list) and len(fields) >= 2 and fields[0] == b"e":
        value = fields[1]
        return value if isinstance(value, bytes) else b""
    return b""
