"""The Lua scripts of messages parked in the store until their due time (ETA sets).

A message sent with a countdown or an ETA, and a retry with one, waits in
``<key_prefix>:eta:<queue>``, a sorted set of ``"<task id>:<message>"`` members by due
time (the task id so that the move to its queue can name the task). Only the supervisors
serving ``queue`` move what is due there.
"""

from __future__ import annotations

from nbtask.brokers.lua_parts import SET_ASIDE, TEXT

__all__ = ["ETA_MEMBER", "ETA_SCRIPTS"]

# An ETA member "<task id>:<message>", split; a member without a task id (not written by
# nbtask) is moved to the dead-letter stream instead, so it cannot stop the others.
# set_aside_every: the keys of another type among keys[first], keys[first + step], ...
ETA_MEMBER = (
    SET_ASIDE
    + TEXT
    + """
local function split_member(member, eta_key, dead_key, maxlen)
  local cut = string.find(member, ':', 1, true)
  if cut and cut > 1 then return string.sub(member, 1, cut - 1), string.sub(member, cut + 1) end
  redis.call('XADD', dead_key, 'MAXLEN', '~', maxlen, '*', 'e', member, 'q', eta_key, 'n', '0')
  redis.call('ZREM', eta_key, member)
  return nil, nil
end
local function next_due(keys, first)
  local nxt = false
  for i = first, #keys, 2 do
    local head = redis.call('ZRANGE', keys[i], 0, 0, 'WITHSCORES')
    if head[2] and (not nxt or tonumber(head[2]) < nxt) then nxt = tonumber(head[2]) end
  end
  if nxt then return text(nxt) end
  return ''
end
local function set_aside_every(keys, first, step)
  local aside = {}
  for i = first, #keys, step do
    if set_aside(keys[i]) == 1 then table.insert(aside, keys[i]) end
  end
  return aside
end
"""
)

# Claim due ETA messages (and ones stuck mid-move) into the moving sets, for a transport
# that publishes them itself. KEYS: dead letters, eta set, moving set, ...
# ARGV: now, stuck-before, maxlen
# Returns {next due or '', quarantined, keys set aside, queue index, member, ...}.
_CLAIM_DUE = (
    ETA_MEMBER
    + """
local out, bad = {'', 0, set_aside_every(KEYS, 2, 1)}, 0
for i = 2, #KEYS, 2 do
  local q = tostring(i / 2)
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', ARGV[1], 'LIMIT', 0, 500)) do
    if split_member(m, KEYS[i], KEYS[1], ARGV[3]) then
      redis.call('ZREM', KEYS[i], m)
      redis.call('ZADD', KEYS[i + 1], ARGV[1], m)
      table.insert(out, q)
      table.insert(out, m)
    else
      bad = bad + 1
    end
  end
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[i + 1], '-inf', ARGV[2], 'LIMIT', 0, 500)) do
    redis.call('ZADD', KEYS[i + 1], ARGV[1], m)
    table.insert(out, q)
    table.insert(out, m)
  end
end
out[1] = next_due(KEYS, 2)
out[2] = bad
return out
"""
)

ETA_SCRIPTS = {
    "claim_due": _CLAIM_DUE,
}
