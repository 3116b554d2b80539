"""The Lua scripts of lost deliveries parked in the store (:mod:`nbtask.brokers.amqp_lost`).

A copy of a message RabbitMQ gave back after its holder died is parked under
``<key_prefix>:lost`` (a sorted set of task ids by when they may be claimed) and
``<key_prefix>:lost:<task id>`` (a hash: the message, its queue, its delivery count and
who held it); a supervisor claims it for a lease, then settles it (a task it sends
again is set back to PENDING first).
"""

from __future__ import annotations

from nbtask.brokers.lua_parts import ENDED, OWN_RECORD, lua

__all__ = ["LOST_SCRIPTS"]

# Park a lost delivery (idempotent), with the consumer (and process) that held it.
# KEYS: lost set, lost hash, record; ARGV: task id, raw, queue, deliveries, now
_PARK_LOST = """
local by = redis.pcall('HMGET', KEYS[3], 'consumer', 'pid')
if type(by) ~= 'table' or by.err then by = {} end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'e', ARGV[2], 'q', ARGV[3], 'n', ARGV[4],
           'h', by[1] or '', 'p', by[2] or '')
redis.call('ZADD', KEYS[1], 'NX', ARGV[5], ARGV[1])
return 1
"""

# Claim lost deliveries that are claimable now, or that this claimant claimed before.
# KEYS: lost set; ARGV: now, lease, claimant, ids...
_CLAIM_LOST = """
local out = {}
for i = 4, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  local entry = KEYS[1] .. ':' .. ARGV[i]
  if score and (tonumber(score) <= tonumber(ARGV[1])
                or redis.call('HGET', entry, 'c') == ARGV[3]) then
    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), ARGV[i])
    redis.call('HSET', entry, 'c', ARGV[3])
    table.insert(out, ARGV[i])
  end
end
return out
"""

# Set a task whose worker died back to PENDING, before its message is sent again (RabbitMQ
# gives a dead holder's delivery back). Only a record still STARTED: one that ended since
# (its holder was paused, not dead, and settled it) keeps its final state, and a record
# gone is not made anew without an expiry; the start check refuses or allows the copy
# sent again either way. KEYS: record. Returns 1 if it was set back, else 0.
_RESET_PENDING = lua(
    OWN_RECORD,
    ENDED,
    """
local state, outcome = own_record(KEYS[1])
if state ~= 'STARTED' or outcome or ended(KEYS[1]) then return 0 end
redis.call('HSET', KEYS[1], 'state', 'PENDING')
return 1
""",
)

LOST_SCRIPTS = {
    "park_lost": _PARK_LOST,
    "claim_lost": _CLAIM_LOST,
    "reset_pending": _RESET_PENDING,
}
