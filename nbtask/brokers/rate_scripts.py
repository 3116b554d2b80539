"""The Lua script that schedules the starts of a rate-limited task, in turn.

``rate_limit`` holds per worker and task name: each such pair has a bucket (its last
start) and a schedule (the last start given out) in Redis, and a task over the limit is
given the next start, kept in its record so that it takes no other when it comes back.
"""

from __future__ import annotations

from nbtask.brokers.lua_parts import TEXT

__all__ = ["RATE_SCRIPTS"]

# A schedule per (worker, task name): tasks start at most `rate` per second, in turn.
# The bucket holds the last start; its schedule the last start given out; its ':given'
# key the start the last task to start was given (its own time when it was given none).
# A task over the limit is given the next one (kept in its record as 'rate_slot', with the
# bucket in 'rate_bucket', so it takes no other when it comes back). One that comes back
# after a late start keeps as far behind that start as it was given: tasks that all came
# back late start in turn, not each at the first start free. A start another bucket gave
# (the task was put back by another worker, maybe one that died since) is no start in
# this one: the task is given this bucket's next, in turn with its other tasks. Returns
# how long to wait, in seconds ('0' = go now), and 1 if a time there was not written by
# nbtask. Only its worker writes them, times by its own clock: anything else (another
# type, not a number, NaN, infinity, a time past `horizon`, which no message waits for)
# would park its tasks for ever, and reads as 0.
# KEYS: bucket, schedule, record, given; ARGV: rate, now, horizon (seconds)
_RATE = (
    TEXT
    + """
local rate, now, horizon = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local gap, bad = 1 / rate, 0
local function time_at(got)  -- a time nbtask wrote, else 0 (and bad)
  if not got then return 0 end
  local at = type(got) ~= 'table' and tonumber(got) or nil
  if at == nil or at ~= at or at > now + horizon then
    bad = 1
    return 0
  end
  return at
end
local function start_now(given)
  local ttl = math.ceil(gap) + 3600
  redis.call('SET', KEYS[1], text(now), 'EX', ttl)
  redis.call('SET', KEYS[4], text(given), 'EX', ttl)
  return {'0', bad}
end
local last = time_at(redis.pcall('GET', KEYS[1]))
local given = time_at(redis.pcall('GET', KEYS[4]))
-- The start this task was given when it was put back: it takes no other, and starts
-- then (or, if the last start came late, as far behind it as it was given behind
-- that one's: at least a gap).
local held = redis.pcall('HMGET', KEYS[3], 'rate_slot', 'rate_bucket')
if held[1] and type(held[1]) ~= 'table' then
  local slot = held[2] == KEYS[1] and time_at(held[1]) or 0
  if slot > 0 then
    local behind = gap
    if given > 0 and slot - given > gap then behind = slot - given end
    local at = math.max(slot, last + behind)
    if at > now then return {text(at - now), bad} end
    redis.call('HDEL', KEYS[3], 'rate_slot', 'rate_bucket')
    return start_now(slot)
  end
  redis.call('HDEL', KEYS[3], 'rate_slot', 'rate_bucket')
end
-- Else the next start after every one given out, even if it is later: calls start in
-- turn.
local slot = math.max(time_at(redis.pcall('GET', KEYS[2])) + gap, last + gap, now)
redis.call('SET', KEYS[2], text(slot), 'EX', math.ceil(slot - now) + 3600)
if slot <= now then return start_now(now) end
redis.call('HSET', KEYS[3], 'rate_slot', text(slot), 'rate_bucket', KEYS[1])
return {text(slot - now), bad}
"""
)

RATE_SCRIPTS = {"rate": _RATE}
