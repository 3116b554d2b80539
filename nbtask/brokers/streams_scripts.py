"""The Redis Streams transport's task scripts: the store's steps fused with its own commands.

Built from the shared Lua of :mod:`nbtask.brokers.scripts`, so the start check and the
records are the same whichever transport runs them; here each step of a task (send,
start, finish) is one round trip.
"""

from __future__ import annotations

from nbtask.brokers.eta_scripts import ETA_MEMBER
from nbtask.brokers.scripts import (
    CHECK_START,
    PARKED_BEFORE,
    WRITE_FINAL,
    WRITE_PENDING,
)

__all__ = ["STREAMS_SCRIPTS"]

# The task id of a stream entry's fields: its plain 'i' field (the worker checks it
# against the signed header before running anything). Entries without one were not
# written by nbtask: 'NOID', and the worker asks the store itself once it has read the
# signed header (as for a task whose message was put back: see CHECK_START).
_ENTRY_START = (
    CHECK_START
    + """
local function entry_start(fields, prefix, ttl, worker, pid, consumer)
  local task_id
  for i = 1, #fields, 2 do if fields[i] == 'i' then task_id = fields[i + 1] end end
  if not task_id then return 'NOID' end
  return check_start(prefix .. task_id, ttl, worker, pid, consumer, '0')
end
"""
)

# Enqueue one message (or park it until its ETA) and write its PENDING record.
# KEYS: stream, eta set, record, client index; ARGV: raw, ttl, due ('' = now), task id,
# now, index upkeep ('0' = not now), new ('1' = an id just drawn), fields...
_PUBLISH = (
    WRITE_PENDING
    + """
local refused = write_pending(KEYS[3], ARGV[2], KEYS[4], ARGV[5], ARGV[4], {unpack(ARGV, 8)},
                              ARGV[6], ARGV[7], true)
if refused ~= '' then return refused end
if ARGV[3] == '' then
  redis.call('XADD', KEYS[1], '*', 'e', ARGV[1], 'n', '0', 'i', ARGV[4])
else
  zadd_replacing(KEYS[2], ARGV[3], ARGV[4] .. ':' .. ARGV[1])
end
return ''
"""
)

# The last step of a task, atomically: store the record, tell the client, park a
# message for later (a retry) and acknowledge the delivery. Returns '' once the record
# is written (or the same retry was parked before: PARKED_BEFORE), else the final state
# that refused it (see WRITE_FINAL).
# KEYS: record, channel, stream, eta set
# ARGV: ttl, maxlen, event ('' = none), entry id ('' = no ack), later ('' = none), due,
# keep_done, keep_channel (see WRITE_FINAL), fields...
_FINISH = (
    WRITE_FINAL
    + PARKED_BEFORE
    + """
local fields, refused = {unpack(ARGV, 9)}, ''
if not parked_before(KEYS[1], fields) then
  refused = write_final(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], fields, ARGV[7], ARGV[8])
  if ARGV[5] ~= '' then zadd_replacing(KEYS[4], ARGV[6], ARGV[5]) end
end
if ARGV[4] ~= '' then
  redis.call('XACK', KEYS[3], 'workers', ARGV[4])
  redis.call('XDEL', KEYS[3], ARGV[4])
end
return refused
"""
)

# Take one message from the first queue (in the order given) that has one, and check it
# may start. When none has, return the last entry id of each stream, so the caller can
# block on XREAD from exactly there and be woken by the next XADD without a race.
# ARGV: group, consumer, record key prefix, ttl, worker, pid
_FETCH = (
    _ENTRY_START
    + """
for i, key in ipairs(KEYS) do
  local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', key, '>')
  if r then
    local entry = r[1][2][1]
    return {i, entry[1], entry[2],
            entry_start(entry[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[2])}
  end
end
local ids = {}
for i, key in ipairs(KEYS) do
  local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
  if last[1] then ids[i] = last[1][1] else ids[i] = '0-0' end
end
return {0, ids}
"""
)

# Sent in the same write as a blocking XREADGROUP, so Redis runs it the moment that
# read is served: the start check costs no extra round trip. It looks at what this
# consumer was given after entry ARGV[7] (nothing, if the read timed out): one read of
# the consumer's own pending entries, with their fields (XREADGROUP from an id; only
# nbtask's own counter 'n' counts deliveries, not the group's). An entry deleted
# meanwhile comes without fields.
# KEYS: stream; ARGV: group, consumer, record key prefix, ttl, worker, pid, last entry id
_STARTED = (
    _ENTRY_START
    + """
local mine = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1,
                        'STREAMS', KEYS[1], ARGV[7])
local entry = mine and mine[1] and mine[1][2][1]
if not entry or not entry[2] then return false end
return {entry[1], entry_start(entry[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[2])}
"""
)

# A delivery this consumer was given by a read whose reply never reached it (the
# connection died while the read was served): the oldest entry still pending for it, with
# its start verdict. That read's start check ran, so a task STARTED by this very consumer
# process may start ('OK'). One STARTED by another process is a dead child's, left for its
# supervisor to settle.
# KEYS: streams; ARGV: group, consumer, record key prefix, ttl, worker, pid
_RECOVER = (
    _ENTRY_START
    + """
for i, key in ipairs(KEYS) do
  for _, p in ipairs(redis.call('XPENDING', key, ARGV[1], '-', '+', 10, ARGV[2])) do
    local entry = redis.call('XRANGE', key, p[1], p[1])
    if #entry == 0 then
      redis.call('XACK', key, ARGV[1], p[1])  -- deleted meanwhile
    else
      local verdict = entry_start(entry[1][2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[2])
      if verdict ~= 'STARTED' then return {i, p[1], entry[1][2], verdict} end
    end
  end
end
return false
"""
)

# Move due ETA messages onto their streams. KEYS: dead letters, eta set, stream, ...
# ARGV: now, maxlen. Returns {next due or '', quarantined, keys set aside}.
_MOVE_DUE = (
    ETA_MEMBER
    + """
local bad, aside = 0, set_aside_every(KEYS, 2, 2)
for i = 2, #KEYS, 2 do
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', ARGV[1], 'LIMIT', 0, 500)) do
    local task_id, raw = split_member(m, KEYS[i], KEYS[1], ARGV[2])
    if task_id then
      redis.call('XADD', KEYS[i + 1], '*', 'e', raw, 'n', '0', 'i', task_id)
      redis.call('ZREM', KEYS[i], m)
    else
      bad = bad + 1
    end
  end
end
return {next_due(KEYS, 2), bad, aside}
"""
)

# A consumer group as XINFO GROUPS lists it (field, value, ...): its name and the last id
# delivered to it.
_GROUP_OF = """
local function group_of(g)
  local name, delivered
  for j = 1, #g, 2 do
    if g[j] == 'name' then name = g[j + 1] end
    if g[j] == 'last-delivered-id' then delivered = g[j + 1] end
  end
  return name, delivered
end
"""

# Delete every message still waiting: stream entries no worker was given yet (after the
# group's last-delivered id; ones being run stay) and the whole ETA set. Returns the task
# ids the entries named. KEYS: stream, eta set, ...; ARGV: group
_PURGE = (
    _GROUP_OF
    + """
local ids = {}
for i = 1, #KEYS, 2 do
  local last = '0-0'
  if redis.call('EXISTS', KEYS[i]) == 1 then
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[i])) do
      local name, delivered = group_of(g)
      if name == ARGV[1] then last = delivered end
    end
  end
  for _, entry in ipairs(redis.call('XRANGE', KEYS[i], last, '+')) do
    if entry[1] ~= last then
      local fields = entry[2]
      for j = 1, #fields, 2 do if fields[j] == 'i' then table.insert(ids, fields[j + 1]) end end
      redis.call('XDEL', KEYS[i], entry[1])
    end
  end
  local waiting = redis.pcall('ZRANGE', KEYS[i + 1], 0, -1)
  if waiting.err then waiting = {} end  -- another type: it held no messages
  for _, m in ipairs(waiting) do
    table.insert(ids, string.sub(m, 1, (string.find(m, ':', 1, true) or 1) - 1))
  end
  redis.call('DEL', KEYS[i + 1])
end
return ids
"""
)

# Make a task queue whose ids were used up (an entry put at, or near, the last possible
# id: Redis numbers entries by its clock, so someone else put it there) take entries
# again: its entries past the clock are deleted, its last id set back to its newest
# remaining entry, and a group given one of them set back as well. Returns how many were
# deleted. KEYS: the queue; ARGV: the clock plus a day, in ms
_REPAIR_QUEUE = (
    _GROUP_OF
    + """
local deleted = 0
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], ARGV[1], '+')) do
  deleted = deleted + redis.call('XDEL', KEYS[1], entry[1])
end
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local last = newest[1] and newest[1][1] or '0-1'
redis.call('XSETID', KEYS[1], last)
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, delivered = group_of(g)
  local ms = tonumber(string.match(delivered, '^%d+'))
  if ms and ms >= tonumber(ARGV[1]) then redis.call('XGROUP', 'SETID', KEYS[1], name, last) end
end
return deleted
"""
)

# Make a task queue's key, found to be of another type (nbtask writes only streams there:
# someone else put it there), the queue again: an empty stream with the workers' group.
# Returns 1 if it replaced the key. KEYS: the queue; ARGV: the group.
_REPLACE_QUEUE = """
if redis.call('TYPE', KEYS[1])['ok'] == 'stream' then return 0 end
redis.call('DEL', KEYS[1])
redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
return 1
"""

STREAMS_SCRIPTS = {
    "publish": _PUBLISH,
    "finish": _FINISH,
    "fetch": _FETCH,
    "started": _STARTED,
    "recover": _RECOVER,
    "move_due": _MOVE_DUE,
    "purge": _PURGE,
    "repair_queue": _REPAIR_QUEUE,
    "replace_queue": _REPLACE_QUEUE,
}
