"""Reads of plain hashes (task records, parked deliveries) that take only what nbtask wrote.

A hash anyone with write access can add to is never read whole (``HGETALL``): only the
fields nbtask writes are read, each only up to the size nbtask writes it at. A larger
value was not written by nbtask, and reading it would cost every reader memory and time
in proportion to what was planted: it reads as absent, and the caller says so once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from nbtask.brokers.redis_link import RedisLink
from nbtask.wire.records import MAX_PLAIN_BYTES, RECORD_FIELDS, TaskRecord

__all__ = ["BOUNDED_SCRIPTS", "read_bounded", "read_record", "read_records"]

log = logging.getLogger(__name__)

# The fields named, each read only if its value is no larger than its bound (an empty one
# reads as absent, as nbtask reads it); a key of another type holds none.
# KEYS: the hash; ARGV: field, bound, field, bound, ...
# Returns {{field, value, ...}, {field over its bound, ...}}.
_READ_BOUNDED = """
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then return {{}, {}} end
local read, over = {}, {}
for i = 1, #ARGV, 2 do
  local size = redis.call('HSTRLEN', KEYS[1], ARGV[i])
  if size > tonumber(ARGV[i + 1]) then
    table.insert(over, ARGV[i])
  elseif size > 0 then
    table.insert(read, ARGV[i])
    table.insert(read, redis.call('HGET', KEYS[1], ARGV[i]))
  end
end
return {read, over}
"""

BOUNDED_SCRIPTS = {"read_bounded": _READ_BOUNDED}


def _bounds_args(bounds: Mapping[str, int]) -> list[str | int]:
    return [part for field, bound in bounds.items() for part in (field, bound)]


def _fields_and_over(reply: list[list[bytes]]) -> tuple[dict[bytes, bytes], list[str]]:
    read, over = reply
    fields = {bytes(read[i]): bytes(read[i + 1]) for i in range(0, len(read), 2)}
    return fields, [bytes(name).decode("utf-8", "replace") for name in over]


def read_bounded(
    link: RedisLink, key: str, bounds: Mapping[str, int]
) -> tuple[dict[bytes, bytes], list[str]]:
    """The fields of hash ``key`` that ``bounds`` names (field -> most bytes), and those over.

    A field over its bound is left out of the first and named in the second; a key of
    another type (not written by nbtask) reads as empty.
    """
    return _fields_and_over(link.call("read_bounded", [key], *_bounds_args(bounds)))


def read_records(link: RedisLink, keys: Sequence[str], max_result: int) -> list[TaskRecord | None]:
    """The task records at ``keys``, in one round trip; ``None`` for one there is none of.

    Only the fields nbtask writes are read, each up to the size it writes them at (its
    signed result up to ``max_result``, the reader's ``max_message_bytes``: a larger one
    would not verify): a larger one reads as absent, with one log line.
    """
    if not keys:
        return []
    bounds = dict.fromkeys(RECORD_FIELDS, MAX_PLAIN_BYTES)
    bounds["result"] = max_result
    args = _bounds_args(bounds)
    with link.translate_errors():  # only reads: safe to send again if a reply is lost
        replies = link.run_scripts(
            [link.evalsha("read_bounded", [key], *args) for key in keys], idempotent=True
        )
    records = []
    for key, reply in zip(keys, replies, strict=True):
        fields, over = _fields_and_over(reply)
        if over:
            log.warning(
                "the task record %s holds %s larger than nbtask writes (%s bytes at most, "
                "its result %s): not read",
                key,
                ", ".join(over),
                f"{MAX_PLAIN_BYTES:,}",
                f"{max_result:,}",
            )
        records.append(TaskRecord.parse(fields))
    return records


def read_record(link: RedisLink, key: str, max_result: int) -> TaskRecord | None:
    """The task record at ``key``; ``None`` if there is none (see :func:`read_records`)."""
    return read_records(link, [key], max_result)[0]
