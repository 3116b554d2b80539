"""The Lua scripts the kombu broker runs on its Redis result store."""

from __future__ import annotations

__all__ = ["CLAIM", "MOVE_DUE", "PARK", "RECORD", "START"]

# Start check of a fetched message, one Redis call: like the Redis broker's, plus the
# consumer that holds it, and 'LOST' for a redelivered message whose task is STARTED.
# STARTED by this very consumer process means its own earlier check, whose reply was lost
# (it runs one task at a time, and is not running this one): 'OK'.
# ARGV: task id, record prefix, ttl, worker, pid, consumer, redelivered ('1'/'0')
START = """
local key = ARGV[2] .. ARGV[1]
local state = redis.call('HGET', key, 'state')
if state == 'STARTED' then
  local by = redis.call('HMGET', key, 'consumer', 'pid')
  if by[1] == ARGV[6] and by[2] == ARGV[5] then return 'OK' end
end
if ARGV[7] == '1' and state == 'STARTED' then return 'LOST' end
if state and state ~= 'PENDING' and state ~= 'RETRY' then return state end
local now = redis.call('TIME')
redis.call('HSET', key, 'state', 'STARTED', 'worker', ARGV[4], 'pid', ARGV[5],
           'consumer', ARGV[6], 'started_at', tostring(tonumber(now[1]) + tonumber(now[2]) / 1e6))
redis.call('EXPIRE', key, ARGV[3])
return 'OK'
"""

# Park a lost delivery (idempotent). KEYS: lost set, lost hash, record
# ARGV: task id, raw, queue, deliveries, now
PARK = """
local holder = redis.call('HGET', KEYS[3], 'consumer') or ''
redis.call('HSET', KEYS[2], 'e', ARGV[2], 'q', ARGV[3], 'n', ARGV[4], 'h', holder)
redis.call('ZADD', KEYS[1], 'NX', ARGV[5], ARGV[1])
return 1
"""

# Claim lost deliveries that are still claimable. KEYS: lost set; ARGV: now, lease, ids...
CLAIM = """
local out = {}
for i = 3, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) <= tonumber(ARGV[1]) then
    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), ARGV[i])
    table.insert(out, ARGV[i])
  end
end
return out
"""

# Write a PENDING record (and park an ETA message). Returns 0 when the task is already
# final (a chain step revoked before it was sent: it stays so), else 1.
# KEYS: record, eta set[, client index]; ARGV: ttl, now, task id, due ('' = now), member,
# fields...
RECORD = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'REVOKED' or state == 'SUCCESS' or state == 'FAILURE' or state == 'WORKER_LOST' then
  return 0
end
if ARGV[4] ~= '' then redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('EXPIRE', KEYS[1], ARGV[1])
if KEYS[3] then
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', tonumber(ARGV[2]) - tonumber(ARGV[1]))
  redis.call('EXPIRE', KEYS[3], ARGV[1])
end
return 1
"""

# Claim due ETA messages (and ones stuck mid-move) into the moving sets.
# KEYS: eta set, moving set, ...; ARGV: now, stuck-before
# Returns {next due or '', queue index, member, queue index, member, ...}.
MOVE_DUE = """
local out = {''}
for i = 1, #KEYS, 2 do
  local q = tostring((i + 1) / 2)
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', ARGV[1], 'LIMIT', 0, 500)) do
    redis.call('ZREM', KEYS[i], m)
    redis.call('ZADD', KEYS[i + 1], ARGV[1], m)
    table.insert(out, q)
    table.insert(out, m)
  end
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[i + 1], '-inf', ARGV[2], 'LIMIT', 0, 500)) do
    redis.call('ZADD', KEYS[i + 1], ARGV[1], m)
    table.insert(out, q)
    table.insert(out, m)
  end
end
local nxt = false
for i = 1, #KEYS, 2 do
  local first = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
  if first[2] and (not nxt or tonumber(first[2]) < nxt) then nxt = tonumber(first[2]) end
end
if nxt then out[1] = tostring(nxt) end
return out
"""
