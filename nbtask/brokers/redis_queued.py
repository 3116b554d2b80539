"""Redis Streams: whether tasks still have a message on their queues, by a scan.

Asked only on the rare look after an outage (:mod:`nbtask.client.lost`): a task whose
record is gone may still be queued (someone deleted the record, or it expired), and a
worker would run it; only a task with no record and no message anywhere is lost. Each
queue's ETA set is read first, then its stream (entries held by workers are still in it):
a message moved from one to the other meanwhile is seen in the stream. Each script call
reads a bounded page, so a long queue never holds the server for long.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import Any

from nbtask.brokers.redis_link import RedisLink

__all__ = ["QUEUED_SCRIPTS", "still_queued"]

log = logging.getLogger(__name__)

#: Entries (or ETA members) one script call reads.
_PAGE = 500
#: Pages read of one queue's stream or ETA set in one look: past them, the tasks not found
#: yet are taken as still queued (a look that cannot finish declares nothing lost).
_MOST_PAGES = 200

# The task ids among ARGV[4..] that a page of a queue's stream or ETA set holds.
# KEYS[1]: the stream or the set; ARGV: 'stream' or 'eta', where the page starts (an entry
# id, or a rank), the page's size, the ids looked for. Returns {where the next page starts
# ('' = done), ids found...}.
_QUEUED_IDS = """
local wanted = {}
for i = 4, #ARGV do wanted[ARGV[i]] = true end
local out, size = {''}, tonumber(ARGV[3])
local kind = redis.call('TYPE', KEYS[1]).ok
if ARGV[1] == 'stream' then
  if kind ~= 'stream' then return out end
  local entries = redis.call('XRANGE', KEYS[1], ARGV[2], '+', 'COUNT', size)
  for _, entry in ipairs(entries) do
    local fields = entry[2]
    for j = 1, #fields - 1, 2 do
      if fields[j] == 'i' and wanted[fields[j + 1]] then table.insert(out, fields[j + 1]) end
    end
  end
  -- After the last entry read, by its id as text: an id's sequence may be past what a
  -- Lua number holds exactly (2^53), and one computed from it could point back.
  if #entries == size then out[1] = '(' .. entries[#entries][1] end
else
  if kind ~= 'zset' then return out end
  local start = tonumber(ARGV[2])
  local members = redis.call('ZRANGE', KEYS[1], start, start + size - 1)
  for _, member in ipairs(members) do
    local id = string.match(member, '^([^:]*):')
    if id and wanted[id] then table.insert(out, id) end
  end
  if #members == size then out[1] = tostring(start + size) end
end
return out
"""

QUEUED_SCRIPTS = {"queued_ids": _QUEUED_IDS}


def still_queued(
    link: RedisLink, keys: Mapping[str, tuple[str, str]], queues: Mapping[str, Collection[str]]
) -> set[str]:
    """The ids of ``queues`` (ids by queue) found in their queues' ETA sets or streams.

    ``keys`` gives each queue's (ETA set, stream) keys.
    """
    found: set[str] = set()
    for queue, task_ids in queues.items():
        eta, stream = keys[queue]
        for kind, key, first in (("eta", eta, "0"), ("stream", stream, "-")):
            wanted = [task_id for task_id in task_ids if task_id not in found]
            start, pages = first, 0
            while wanted and start:
                if pages == _MOST_PAGES:
                    log.warning(
                        "%s holds more than %s entries: %s task(s) not found in it are taken "
                        "as still queued",
                        key,
                        f"{_MOST_PAGES * _PAGE:,}",
                        len(wanted),
                    )
                    found.update(wanted)
                    break
                reply: Any = link.call("queued_ids", [key], kind, start, _PAGE, *wanted)
                start, pages = reply[0].decode(), pages + 1
                found.update(raw.decode() for raw in reply[1:])
                wanted = [task_id for task_id in wanted if task_id not in found]
    return found
