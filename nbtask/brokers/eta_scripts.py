"""The Lua scripts of messages parked in the store until their due time (ETA sets).

A message sent with a countdown or an ETA, and a retry with one, waits in
``<key_prefix>:eta:<queue>``, a sorted set of ``"<task id>:<message>"`` members by due
time (the task id so that the move to its queue can name the task). Only the supervisors
serving ``queue`` move what is due there; a process's own queue is served by its own
alone, so once that process is gone what is parked for its queue is parked again for the
queue it falls back to (:data:`ETA_SCRIPTS` ``repark``, ``dead_letter_parked``).
"""

from __future__ import annotations

from nbtask.brokers.lua_parts import NOTE_MOVED, SET_ASIDE, TEXT, ZADD_REPLACING, lua

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

# What is parked for one queue, soonest first, at most ARGV[1] members in all: read to be
# parked again elsewhere, and left in place (see _REPARK). A key of another type (nbtask
# writes only sorted sets there) is set aside. KEYS: the sets it may wait in (its ETA set;
# on RabbitMQ its moving set too). Returns {keys set aside, key index, member, due, ...}.
_PARKED = (
    SET_ASIDE
    + """
local out, left = {{}}, tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  if set_aside(key) == 1 then table.insert(out[1], key) end
  if left > 0 then
    local got = redis.call('ZRANGE', key, 0, left - 1, 'WITHSCORES')
    for j = 1, #got, 2 do
      table.insert(out, i)
      table.insert(out, got[j])
      table.insert(out, got[j + 1])
    end
    left = left - #got / 2
  end
end
return out
"""
)

# Park a message again for another queue, due when it was (sealed again for that queue by
# the caller), and name that queue in its task's record (NOTE_MOVED). Only if it is still
# where it was read: the supervisor serving its old queue may have moved it there
# meanwhile (a paused one, woken), and then nothing is done. Written in its new place
# before it is taken off the old one, so that an error on the way loses nothing.
# KEYS: the set it was read in, the new queue's ETA set, record
# ARGV: member, due, new member, new queue. Returns 1 once moved, else 0.
_REPARK = lua(
    ZADD_REPLACING,
    NOTE_MOVED,
    """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
zadd_replacing(KEYS[2], ARGV[2], ARGV[3])
note_moved(KEYS[3], ARGV[4])
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
""",
)

# Keep a parked message in the dead-letter stream (one that cannot be parked again: it
# does not verify), taking it off its set; only if it is still there (see _REPARK). A
# dead-letter stream Redis refuses it for (another type, or ids used up: nbtask wrote
# neither) is replaced, as the store does for its other dead letters.
# KEYS: the set it was read in, dead letters; ARGV: member, XADD's arguments after the key.
# Returns 0 if it was gone, 1 once kept, 2 once kept in a stream made anew.
_DEAD_LETTER_PARKED = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
local kept, made = redis.pcall('XADD', KEYS[2], unpack(ARGV, 2)), 1
if type(kept) == 'table' and kept.err then
  local used_up = string.find(kept.err, 'last possible', 1, true)
  if string.sub(kept.err, 1, 9) ~= 'WRONGTYPE' and not used_up then
    return redis.error_reply(kept.err)
  end
  redis.call('DEL', KEYS[2])
  redis.call('XADD', KEYS[2], unpack(ARGV, 2))
  made = 2
end
redis.call('ZREM', KEYS[1], ARGV[1])
return made
"""

ETA_SCRIPTS = {
    "claim_due": _CLAIM_DUE,
    "parked": _PARKED,
    "repark": _REPARK,
    "dead_letter_parked": _DEAD_LETTER_PARKED,
}
