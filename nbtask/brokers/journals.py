"""Task journals in Redis: what workers said about a task, kept with it for ``result_ttl``.

A journal is a plain list anyone with write access can add to, so it is read only as
nbtask writes it: its newest :data:`JOURNAL_LINES` entries, each up to
:data:`JOURNAL_LINE_BYTES`. A worker cuts a longer one to that size as it writes it (its
middle goes); a longer one in the list was planted, and reading it would cost the reader
(``nbtask log``, ``%nbtask log``) memory in proportion to what was planted: it is left
out, with one line saying so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from nbtask._text import printable
from nbtask.brokers.redis_link import RedisLink

__all__ = ["JOURNAL_LINES", "JOURNAL_LINE_BYTES", "JOURNAL_SCRIPTS", "append", "read"]

log = logging.getLogger(__name__)

#: The newest lines a journal keeps.
JOURNAL_LINES = 1_000
#: The longest line a journal keeps, in UTF-8 bytes (a longer one loses its middle).
JOURNAL_LINE_BYTES = 4_096

# The newest ARGV[1] lines of list KEYS[1], leaving out those over ARGV[2] bytes; a key of
# another type (not written by nbtask) reads as empty. Returns {lines, how many left out}.
_READ = """
if redis.call('TYPE', KEYS[1])['ok'] ~= 'list' then return {{}, 0} end
local bound, lines, over = tonumber(ARGV[2]), {}, 0
for _, line in ipairs(redis.call('LRANGE', KEYS[1], -tonumber(ARGV[1]), -1)) do
  if #line > bound then over = over + 1 else table.insert(lines, line) end
end
return {lines, over}
"""

JOURNAL_SCRIPTS = {"read_journal": _READ}

_CUT = " [nbtask: line cut here] "


def _kept(line: str) -> bytes:
    """``line`` as the journal keeps it: at most :data:`JOURNAL_LINE_BYTES`, saying so.

    A longer one keeps its head and its tail: a traceback logged as one record ends with
    the exception itself.
    """
    data = line.encode("utf-8", "replace")
    if len(data) <= JOURNAL_LINE_BYTES:
        return data
    cut = _CUT.encode()
    half = (JOURNAL_LINE_BYTES - len(cut)) // 2
    # (A character split by the cut is dropped, not kept half.)
    head = data[:half].decode("utf-8", "ignore").encode()
    tail = data[-half:].decode("utf-8", "ignore").encode()
    return head + cut + tail


def append(link: RedisLink, key: str, lines: Sequence[str], ttl: int) -> None:
    """Keep ``lines`` in the journal at ``key`` for ``ttl`` seconds (its newest lines)."""
    with link.translate_errors():
        link.run(
            [
                ("RPUSH", key, *(_kept(line) for line in lines)),
                ("LTRIM", key, -JOURNAL_LINES, -1),
                ("EXPIRE", key, ttl),
            ]
        )


def read(link: RedisLink, key: str) -> list[str]:
    """The journal at ``key``, oldest first (unsigned: shown printable)."""
    with link.translate_errors():
        lines, over = link.call("read_journal", [key], JOURNAL_LINES, JOURNAL_LINE_BYTES)
    if over:
        log.warning(
            "the task journal %s holds %d line(s) longer than nbtask writes (%s bytes at "
            "most): not read",
            key,
            over,
            f"{JOURNAL_LINE_BYTES:,}",
        )
    # A record of several lines (a traceback) is kept as one entry: shown as its lines.
    text = (bytes(line).decode("utf-8", "replace") for line in lines)
    return [printable(part) for entry in text for part in entry.split("\n")]
