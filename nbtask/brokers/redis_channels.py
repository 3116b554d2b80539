"""Clients' event channels on Redis: the part of the result store that carries events.

``<key_prefix>:c:<client id>`` is a client's channel, a stream of signed events (``e``
fields; an empty entry only wakes a blocked reader), trimmed to :data:`CHANNEL_MAXLEN`,
kept while the client lives and ``result_ttl`` after.

Anyone with write access to the store can append to a channel (its name is in every
record its client sent): a read takes at most :data:`READ_COUNT` entries and
:func:`read_budget` bytes, and an entry larger than any event a client accepts
(``max_message_bytes``) is left in Redis, read as empty, with one log line.
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

__all__ = [
    "CHANNEL_MAXLEN",
    "CHANNEL_SCRIPTS",
    "READ_COUNT",
    "RedisChannels",
    "entry_before",
    "entry_key",
    "entry_text",
    "event_of",
    "read_budget",
    "refuses_entries",
]

log = logging.getLogger(__name__)

#: Events kept per client channel (older ones are trimmed).
CHANNEL_MAXLEN = 10_000
#: The most entries one read of client channels takes.
READ_COUNT = 500
_READ_BYTES = 64 * 1024 * 1024


def read_budget(max_event_bytes: int) -> int:
    """The most bytes one read takes (or one entry, when a single one is larger)."""
    return min(_READ_BYTES, 4 * max_event_bytes)


# Read entries after given ids of streams (KEYS), without sending any larger than a
# client accepts. ARGV: count, largest entry, budget, then one id per stream. An entry's
# size counts all its fields; only its event is sent, or '' with its size when too large.
# Entries stop at `count`, or before the one that would take the total past the budget
# (the first is always taken). Returns {{stream, id, event, size of one too large or 0}...,
# cut}: cut is 1 when it stopped so (more may wait), 0 when it read every stream to its end.
_READ = """
local count, largest, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out, total, taken = {}, 0, 0
for i, key in ipairs(KEYS) do
  local entries = redis.call('XRANGE', key, '(' .. ARGV[3 + i], '+', 'COUNT', count - taken)
  for _, entry in ipairs(entries) do
    local fields, size = entry[2], 0
    for j = 1, #fields do size = size + #fields[j] end
    if size > largest then
      table.insert(out, {key, entry[1], '', size})
    else
      if taken > 0 and total + size > budget then return {out, 1} end
      total = total + size
      table.insert(out, {key, entry[1], fields[1] == 'e' and fields[2] or '', 0})
    end
    taken = taken + 1
  end
  if taken >= count then return {out, 1} end
end
return {out, 0}
"""

#: The scripts reading client channels, by name.
CHANNEL_SCRIPTS = {"read_events": _READ}


class RedisChannels:
    """The client channels of :class:`~nbtask.brokers.redis_store.RedisStore`."""

    link: RedisLink
    prefix: str
    ttl: int
    #: The largest event a client accepts (``max_message_bytes``).
    max_event_bytes: int

    def channel_key(self, client_id: str) -> str:
        """The stream carrying events to one client."""
        return f"{self.prefix}:c:{client_id}"

    def is_channel(self, name: str) -> bool:
        """True if ``name`` is shaped like a client channel of this key prefix."""
        return _channel_name(self.channel_key("")).fullmatch(name) is not None

    def event_command(self, channel: str, raw: bytes) -> tuple[Any, ...]:
        """The command appending one event to a client's channel."""
        return ("XADD", channel, "MAXLEN", "~", CHANNEL_MAXLEN, "*", "e", raw)

    def append_events(self, channel: str, raw_events: Sequence[bytes]) -> list[str]:
        """Append events to a client's channel, in one round trip; the ids they were kept under."""
        commands = [self.event_command(channel, raw) for raw in raw_events]
        return [entry_text(reply) for reply in self.append_replacing(channel, commands)]

    def append_replacing(
        self, stream: str, commands: list[tuple[Any, ...]], *, large: bool = False
    ) -> list[Any]:
        """Run ``commands``, which append to ``stream``, replacing it if Redis refuses.

        A stream Redis refuses an entry for (a key of another type, or a stream whose ids
        were used up by an entry put at the last one) was not written by nbtask, and
        nothing could be appended to it again (the store's scripts do the same for a
        client's channel: WRITE_FINAL). ``large``: as :meth:`RedisLink.run`'s. Returns
        the replies of ``commands``.
        """
        with self.link.translate_errors():
            try:
                return self.link.run(commands, large=large)
            except ResponseError as exc:
                if not refuses_entries(exc):
                    raise
                log.error("replaced %s, which nbtask did not write: %s", stream, exc)
                return self.link.run([("DEL", stream), *commands], large=large)[1:]

    #: Whether entries may wait that the last read's script did not return, or that
    #: its blocking read sent (see :meth:`read_events`).
    _behind = False

    def read_events(
        self, channels: Mapping[str, str], block_seconds: float
    ) -> list[tuple[str, str, bytes]]:
        """Block on client channels ``{channel: after id}``; ``(channel, id, raw)`` triples.

        In one write: a blocking read waits for the next entry after each position (at
        once if one waits), then a script reads what waits, sending no entry too large
        and stopping at the read's budget. Both replies come back together, so the
        reading thread sleeps once per read. What the read returns is the script's (the
        blocking read's only when the script found nothing: it was trimmed in between,
        an entry too large dropped here). The blocking read sends a copy of the first
        entry after each position, however large (anyone with write access can put one
        there), which the script, run after it, returns too; so that it does not copy
        one again at every read until the script reached it, the script reads alone
        while entries it did not return may wait (it stopped at its count or budget
        before a channel's copied entry), until it reads to the end. Else every entry the
        blocking read copied is one this read returns, and the next read's blocking read
        copies none of them: each entry reaches the client at most once in a copy.
        """
        budget = read_budget(self.max_event_bytes)
        args = (READ_COUNT, self.max_event_bytes, budget, *channels.values())
        read = self.link.evalsha("read_events", list(channels), *args)
        block = max(1, int(block_seconds * 1000))
        waiting = ("XREAD", "COUNT", 1, "BLOCK", block, "STREAMS", *channels, *channels.values())
        woken: Any = None
        with self.link.translate_errors():
            found = self._behind and self.link.run_scripts([read], idempotent=True)[0]
            if not (found and found[0]):
                # The blocking read first: Redis runs the script once it returns, and
                # sends both replies at once.
                woken, found = self.link.run_scripts(
                    [waiting, read], block_seconds=block_seconds, idempotent=True
                )
        scripted, cut = found
        if not scripted:
            self._behind = False
            return self._woken(woken)
        self._behind = bool(cut) or _copied_unreturned(scripted, woken)
        return [self._sized(*entry) for entry in scripted]

    def _woken(self, woken: Any) -> list[tuple[str, str, bytes]]:
        """The entries a blocking read of client channels returned; a too large one empty."""
        out = []
        for stream, entries in woken or ():
            for entry_id, fields in entries:
                size = sum(len(field) for field in fields) if isinstance(fields, list) else 0
                if size > self.max_event_bytes:
                    out.append(self._sized(stream, entry_id, b"", size))
                else:
                    out.append(self._sized(stream, entry_id, event_of(fields), 0))
        return out

    def _sized(
        self, stream: bytes, entry_id: bytes, raw: bytes, dropped: int
    ) -> tuple[str, str, bytes]:
        """A read entry; one too large (``dropped`` bytes) reads as empty, said once."""
        channel, entry = stream.decode(), entry_id.decode()
        if dropped:
            log.warning(
                "ignored entry %s of %s: %s bytes, more than any event a client accepts "
                "(max_message_bytes, %s); nbtask did not write it",
                entry,
                channel,
                f"{dropped:,}",
                f"{self.max_event_bytes:,}",
            )
        return channel, entry, raw

    def events_after(self, channel: str, after: str) -> list[tuple[str, bytes]]:
        """``(id, raw)`` of the events on ``channel`` after entry ``after`` (``"0-0"``: all)."""
        with self.link.translate_errors():
            return self._kept(channel, after)

    def event_at(self, channel: str, entry_id: str) -> bytes | None:
        """The event kept under ``entry_id`` on ``channel``; ``None`` if there is none.

        Read as :meth:`read_events` reads (an entry too large reads as empty).
        """
        before = entry_before(entry_id)
        if before is None:
            return None
        args = (1, self.max_event_bytes, read_budget(self.max_event_bytes), before)
        with self.link.translate_errors():
            ((entries, _),) = self.link.run_scripts(
                [self.link.evalsha("read_events", [channel], *args)], idempotent=True
            )
        if not entries or entries[0][1].decode() != entry_id:
            return None
        _, _, raw = self._sized(*entries[0])
        return raw

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
        return (entry_key(entry_text(first[0])) or (0, 0)) > (entry_key(after) or (0, 0))

    def drop_event(self, channel: str, entry_id: str) -> None:
        """Delete one entry of a client's channel."""
        with self.link.translate_errors():
            self.link.run([("XDEL", channel, entry_id)])

    def replay(self, channel: str) -> list[bytes]:
        """Every event still kept on a client's channel, oldest first."""
        with self.link.translate_errors():
            try:
                kept = self._kept(channel, "0-0")
            except ResponseError:  # not a stream (a record names any channel): none kept
                log.error("ignored %s: not a stream, not written by nbtask", channel)
                return []
        return [raw for _id, raw in kept if raw]

    def _kept(self, channel: str, after: str) -> list[tuple[str, bytes]]:
        """``(id, raw)`` of the entries after ``after``, up to a channel's length of them.

        Read as :meth:`read_events` reads: no entry too large is sent.
        """
        budget = read_budget(self.max_event_bytes)
        out: list[tuple[str, bytes]] = []
        while len(out) < CHANNEL_MAXLEN:
            count = min(READ_COUNT, CHANNEL_MAXLEN - len(out))
            args = (count, self.max_event_bytes, budget, after)
            ((entries, cut),) = self.link.run_scripts(
                [self.link.evalsha("read_events", [channel], *args)]
            )
            for entry in entries:
                _, after, raw = self._sized(*entry)
                out.append((after, raw))
            if not cut:  # read to the channel's end
                break
        return out

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


def _copied_unreturned(scripted: list[Any], woken: Any) -> bool:
    """Whether a blocking read sent with the script copied an entry the script did not return."""
    returned = {entry[1] for entry in scripted}
    return any(entry[0] not in returned for _stream, entries in woken or () for entry in entries)


#: The largest part of a stream entry id (both are unsigned 64-bit numbers).
_ID_PART_MAX = (1 << 64) - 1
_ENTRY_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")


def entry_key(entry_id: str) -> tuple[int, int] | None:
    """A stream entry id (``"<ms>-<seq>"``) as numbers, to compare ids; ``None`` if not one."""
    match = _ENTRY_ID.fullmatch(entry_id)
    if match is None:
        return None
    millis, seq = int(match[1]), int(match[2])
    return (millis, seq) if millis <= _ID_PART_MAX and seq <= _ID_PART_MAX else None


def entry_before(entry_id: str) -> str | None:
    """The id just before ``entry_id`` (none before ``0-0``, nor an id that is not one)."""
    key = entry_key(entry_id)
    if key is None or key == (0, 0):
        return None
    millis, seq = key
    return f"{millis}-{seq - 1}" if seq else f"{millis - 1}-{_ID_PART_MAX}"


def entry_text(reply: object) -> str:
    """An entry id a script or XADD replied with, as text; ``''`` for anything else."""
    return reply.decode() if isinstance(reply, bytes) else reply if isinstance(reply, str) else ""


def event_of(fields: Any) -> bytes:
    """The raw event of a stream entry's flat field list (``b""`` for a wake-up or junk).

    Also the control stream's entries, which are written the same way.
    """
    if isinstance(fields, list) and len(fields) >= 2 and fields[0] == b"e":
        value = fields[1]
        return value if isinstance(value, bytes) else b""
    return b""
