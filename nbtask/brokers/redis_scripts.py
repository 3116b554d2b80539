"""The Lua scripts of the Redis broker: each step that must be atomic is one script.

Scripts see keys and arguments exactly as the Python side documents them beside each.
"""

from __future__ import annotations

__all__ = [
    "FETCH", "FINISH", "FORGET_UNSENT", "MOVE_DUE", "PUBLISH", "PURGE", "RATE", "RECOVER",
    "REVOKE", "START", "STARTED",
]  # fmt: skip

# Mark a task STARTED unless it must not run, atomically with its delivery. A task may
# start only from PENDING/RETRY (or with no record, e.g. an expired one): this refuses
# duplicates of a running task, replays of a finished one and revoked tasks. Returns
# 'OK' or the state that forbids it. The task id is the stream entry's plain 'i' field;
# the worker checks it against the signed header before running anything.
CHECK_START = """
local function check_start(fields, prefix, ttl, worker, pid)
  local task_id
  for i = 1, #fields, 2 do if fields[i] == 'i' then task_id = fields[i + 1] end end
  if not task_id then return 'NOID' end
  local key = prefix .. task_id
  local state = redis.call('HGET', key, 'state')
  if state and state ~= 'PENDING' and state ~= 'RETRY' then return state end
  local now = redis.call('TIME')
  redis.call('HSET', key, 'state', 'STARTED', 'worker', worker, 'pid', pid,
             'started_at', tostring(tonumber(now[1]) + tonumber(now[2]) / 1e6))
  redis.call('EXPIRE', key, ttl)
  return 'OK'
end
"""

# Take one message from the first queue (in the order given) that has one, and check it
# may start. When none has, return the last entry id of each stream, so the caller can
# block on XREAD from exactly there and be woken by the next XADD without a race.
# ARGV: group, consumer, record key prefix, ttl, worker, pid
FETCH = (
    CHECK_START
    + """
for i, key in ipairs(KEYS) do
  local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', key, '>')
  if r then
    local entry = r[1][2][1]
    return {i, entry[1], entry[2], check_start(entry[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])}
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
# consumer was given after entry ARGV[7] (nothing, if the read timed out).
# KEYS: stream; ARGV: group, consumer, record key prefix, ttl, worker, pid, last entry id
STARTED = (
    CHECK_START
    + """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '(' .. ARGV[7], '+', 1, ARGV[2])
if #pending == 0 then return false end
local entry = redis.call('XRANGE', KEYS[1], pending[1][1], pending[1][1])
if #entry == 0 then return false end
return {entry[1][1], check_start(entry[1][2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])}
"""
)

START = (
    CHECK_START
    + """
return check_start({'i', ARGV[1]}, ARGV[2], ARGV[3], ARGV[4], ARGV[5])
"""
)

# A delivery this consumer was given by a read whose reply never reached it (the
# connection died while the read was served): the oldest entry still pending for it, with
# its start verdict. That read's start check ran, so a task STARTED by this very process
# (worker, pid) may start: 'OK'. One STARTED by another process is a dead child's, left
# for its supervisor to settle.
# KEYS: streams; ARGV: group, consumer, record key prefix, ttl, worker, pid
RECOVER = (
    CHECK_START
    + """
for i, key in ipairs(KEYS) do
  for _, p in ipairs(redis.call('XPENDING', key, ARGV[1], '-', '+', 10, ARGV[2])) do
    local entry = redis.call('XRANGE', key, p[1], p[1])
    if #entry == 0 then
      redis.call('XACK', key, ARGV[1], p[1])  -- deleted meanwhile
    else
      local fields, task_id = entry[1][2], nil
      for j = 1, #fields, 2 do if fields[j] == 'i' then task_id = fields[j + 1] end end
      local r = {}
      if task_id then r = redis.call('HMGET', ARGV[3] .. task_id, 'state', 'worker', 'pid') end
      if r[1] == 'STARTED' and r[2] == ARGV[5] and r[3] == ARGV[6] then
        return {i, p[1], fields, 'OK'}
      elseif r[1] ~= 'STARTED' then
        return {i, p[1], fields, check_start(fields, ARGV[3], ARGV[4], ARGV[5], ARGV[6])}
      end
    end
  end
end
return false
"""
)

# The last step of a task, atomically: store the record (no fields: delete it), tell the
# client, park a message for later (a retry) and acknowledge the delivery.
# KEYS: record, channel, stream, eta set
# ARGV: ttl, maxlen, event ('' = none), entry id ('' = no ack), later ('' = none), due, fields...
# A field value '=event' stands for the event itself (a stored result), sent only once.
FINISH = """
if #ARGV > 6 then
  for i = 8, #ARGV, 2 do
    if ARGV[i] == '=event' then ARGV[i] = ARGV[3] end
  end
  redis.call('HSET', KEYS[1], unpack(ARGV, 7))
  redis.call('EXPIRE', KEYS[1], ARGV[1])
elseif ARGV[3] ~= '' then
  redis.call('DEL', KEYS[1])
end
if ARGV[3] ~= '' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'e', ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[1])
end
if ARGV[5] ~= '' then redis.call('ZADD', KEYS[4], ARGV[6], ARGV[5]) end
if ARGV[4] ~= '' then
  redis.call('XACK', KEYS[3], 'workers', ARGV[4])
  redis.call('XDEL', KEYS[3], ARGV[4])
end
return 1
"""

# A token bucket per (worker, task name) holding one token: tasks start at most ``rate``
# per second. Returns how long to wait, in seconds ('0' = go now).
# KEYS: bucket; ARGV: rate, now
RATE = """
local rate, now = tonumber(ARGV[1]), tonumber(ARGV[2])
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
if last + 1 / rate > now then return tostring(last + 1 / rate - now) end
redis.call('SET', KEYS[1], tostring(now), 'EX', 3600)
return '0'
"""

# Enqueue one message (or park it until its ETA) and write its PENDING record.
# ETA members are "<task id>:<message>", so the move to the stream can set 'i'.
# KEYS: stream, eta set, record; ARGV: raw, ttl, eta ('' = now), task id, fields...
PUBLISH = """
-- A task already final (a chain step revoked before a worker sent it) stays so.
local state = redis.call('HGET', KEYS[3], 'state')
if state == 'REVOKED' or state == 'SUCCESS' or state == 'FAILURE' or state == 'WORKER_LOST' then
  return 0
end
if ARGV[3] == '' then
  redis.call('XADD', KEYS[1], '*', 'e', ARGV[1], 'n', '0', 'i', ARGV[4])
else
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4] .. ':' .. ARGV[1])
end
redis.call('HSET', KEYS[3], unpack(ARGV, 6))
redis.call('EXPIRE', KEYS[3], ARGV[2])
if KEYS[4] then
  redis.call('ZADD', KEYS[4], ARGV[5], ARGV[4])
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', tonumber(ARGV[5]) - tonumber(ARGV[2]))
  redis.call('EXPIRE', KEYS[4], ARGV[2])
end
return 1
"""

REVOKE = """
local state = redis.call('HGET', KEYS[1], 'state')
if state and state ~= 'PENDING' and state ~= 'RETRY' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'REVOKED', 'result', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'e', ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""

MOVE_DUE = """
local moved = 0
for i = 1, #KEYS, 2 do
  local due = redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', ARGV[1], 'LIMIT', 0, 500)
  for _, m in ipairs(due) do
    local cut = string.find(m, ':', 1, true)
    redis.call('XADD', KEYS[i + 1], '*', 'e', string.sub(m, cut + 1), 'n', '0',
               'i', string.sub(m, 1, cut - 1))
    redis.call('ZREM', KEYS[i], m)
    moved = moved + 1
  end
end
local nxt = false
for i = 1, #KEYS, 2 do
  local first = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
  if first[2] and (not nxt or tonumber(first[2]) < nxt) then nxt = tonumber(first[2]) end
end
if nxt then return tostring(nxt) end
return false
"""

# Delete every message still waiting: stream entries no worker was given yet (after the
# group's last-delivered id; ones being run stay) and the whole ETA set. Returns the task
# ids the entries named. KEYS: stream, eta set, ...; ARGV: group
PURGE = """
local ids = {}
for i = 1, #KEYS, 2 do
  local last = '0-0'
  if redis.call('EXISTS', KEYS[i]) == 1 then
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[i])) do
      local name, delivered
      for j = 1, #g, 2 do
        if g[j] == 'name' then name = g[j + 1] end
        if g[j] == 'last-delivered-id' then delivered = g[j + 1] end
      end
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
  for _, m in ipairs(redis.call('ZRANGE', KEYS[i + 1], 0, -1)) do
    table.insert(ids, string.sub(m, 1, (string.find(m, ':', 1, true) or 1) - 1))
  end
  redis.call('DEL', KEYS[i + 1])
end
return ids
"""

# A record without a client was written by a start check alone, for a task id that came
# beside a message no client sent (it then failed verification): delete it. KEYS: record
FORGET_UNSENT = """
if redis.call('HEXISTS', KEYS[1], 'client') == 0 then return redis.call('DEL', KEYS[1]) end
return 0
"""
