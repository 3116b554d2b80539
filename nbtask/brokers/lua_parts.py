r"""The Lua functions the task scripts are built from, each written once.

The store's scripts (:mod:`nbtask.brokers.scripts`) and the Redis Streams transport's
(:mod:`nbtask.brokers.streams_scripts`) are built from these: a number as text, the
writes that replace a key nbtask did not write, a task record's state and signed outcome,
and the set of ended tasks. Each part is Lua source defining ``local function``\ s; a
tuple part is one with the parts it calls, in order (:func:`with_parts`, :func:`lua`).
"""

from __future__ import annotations

from nbtask.wire.events import WAITING_STATE_NAMES

__all__ = [
    "DONE_OF",
    "ENDED",
    "MARK_ENDED",
    "NOTE_MOVED",
    "OWN_RECORD",
    "RECORD_STATE",
    "REVOKES_TASK",
    "SET_ASIDE",
    "STATE_AND_OUTCOME",
    "TEXT",
    "XADD_KEEPING",
    "XADD_REPLACING",
    "ZADD_REPLACING",
    "lua",
    "waits_unstarted",
    "with_parts",
]

# Each script is built from only the Lua functions it calls: every function a script
# defines is made anew on each run (a closure, then garbage), on the hot path too.


def with_parts(*parts: str | tuple[str, ...]) -> tuple[str, ...]:
    """Lua functions, each once, in order: a tuple part is one with those it calls."""
    return tuple(
        dict.fromkeys(p for part in parts for p in ((part,) if isinstance(part, str) else part))
    )


def lua(*parts: str | tuple[str, ...]) -> str:
    """The Lua of :func:`with_parts`'s functions, a function before the ones calling it."""
    return "".join(with_parts(*parts))


# A number as text, in full: Lua's tostring() keeps 14 significant digits, which put a
# Unix time up to 50 us off (a start, a due time).
TEXT = """
local function text(x) return string.format('%.17g', x) end
"""
# The ended-task set and the ETA sets are sorted sets: a key of another type there was
# not written by nbtask (someone with write access to Redis put it there). Reading, it
# holds nothing; writing (zadd_replacing) replaces it; the supervisor's housekeeping sets
# it aside with a log line (set_aside returns 1 when it deleted one).
SET_ASIDE = """
local function set_aside(key)
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'zset' or kind == 'none' then return 0 end
  redis.call('DEL', key)
  return 1
end
"""
# Written first, looked at only if refused: a key of another type is replaced, any other
# error raised as redis.call raises it (one command, not TYPE then ZADD, on every write).
# Returns ZADD's reply (1: the member is new), and true when the key was made anew.
ZADD_REPLACING = """
local function zadd_replacing(key, score, member)
  local reply = redis.pcall('ZADD', key, score, member)
  if type(reply) ~= 'table' then return reply, false end
  if string.sub(reply.err or '', 1, 9) == 'WRONGTYPE' then redis.call('DEL', key) end
  return redis.call('ZADD', key, score, member), true
end
"""
# A client's channel Redis refuses an event for (a key of another type, or a stream whose
# ids were used up by an entry put at the last one) was not written by nbtask: replaced,
# or no event would reach that client again. Any other error is raised as redis.call
# raises it. Returns the id the event was kept under (published beside it on RabbitMQ).
XADD_REPLACING = """
local function xadd_replacing(key, maxlen, event)
  local reply = redis.pcall('XADD', key, 'MAXLEN', '~', maxlen, '*', 'e', event)
  if type(reply) ~= 'table' or not reply.err then return reply end
  local used_up = string.find(reply.err, 'last possible', 1, true)
  if string.sub(reply.err, 1, 9) == 'WRONGTYPE' or used_up then redis.call('DEL', key) end
  return redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', 'e', event)
end
"""

# Append an event to a client's channel and push the channel's expiry back to `ttl`; with
# `keep` '0' (a worker settling tasks pushes it back once a second per channel: see
# WRITE_FINAL) only a channel that exists takes it (NOMKSTREAM), and one this append makes
# anew (it expired, or was deleted) still gets its expiry: else it would never go.
# Returns the id the event was kept under.
XADD_KEEPING = with_parts(
    XADD_REPLACING,
    """
local function xadd_keeping(key, maxlen, event, ttl, keep)
  if keep == '0' then
    local id = redis.pcall('XADD', key, 'NOMKSTREAM', 'MAXLEN', '~', maxlen, '*', 'e', event)
    if type(id) == 'string' then return id end  -- (false: no such stream; a table: an error)
  end
  local id = xadd_replacing(key, maxlen, event)
  redis.call('EXPIRE', key, ttl)
  return id
end
""",
)

# The record at `key` as a hash: anything else there was not written by nbtask (someone
# with write access to Redis put it there). Reading: 'bad'; writing: it is replaced.
RECORD_STATE = """
local function record_state(key)
  local state = redis.pcall('HGET', key, 'state')
  if type(state) == 'table' then return 'bad' end
  return state
end
"""


def waits_unstarted(state: str) -> str:
    """A Lua test that the record state held in ``state`` says its message waits unstarted.

    Spelled from :data:`~nbtask.wire.events.WAITING_STATE_NAMES` (``PENDING``, ``RETRY``):
    inline, not a Lua function, which each run of a script would make anew.
    """
    return "(" + " or ".join(f"{state} == '{name}'" for name in WAITING_STATE_NAMES) + ")"


# Name `queue` in the record at `key` of a task whose waiting message was moved there
# (off a gone process's own queue). Only a record whose message waits unstarted (PENDING,
# or RETRY: a retry waiting there): no record is made (one without an expiry would stay
# for good), and one that moved on (started, ended) is left as it is. Returns 1 once
# written, else 0.
NOTE_MOVED = with_parts(
    RECORD_STATE,
    """
local function note_moved(key, queue)
  local state = record_state(key)
  if not """
    + waits_unstarted("state")
    + """ then return 0 end
  redis.call('HSET', key, 'queue', queue)
  return 1
end
""",
)


# The record's state and its signed outcome (false for none), in one read ('bad' for
# another type). The outcome is read whole, but only a task that ended has one.
STATE_AND_OUTCOME = """
local function state_and_outcome(key)
  local got = redis.pcall('HMGET', key, 'state', 'result')
  if got.err then return 'bad', false end
  return got[1], got[2]
end
"""
# The record's state, once anything of another type at `key` is deleted (nil then), and
# whether it holds a signed outcome.
OWN_RECORD = with_parts(
    STATE_AND_OUTCOME,
    """
local function own_record(key)
  local state, outcome = state_and_outcome(key)
  if state == 'bad' then
    redis.call('DEL', key)
    return nil, false
  end
  return state, outcome
end
""",
)
# Ended tasks are also remembered apart from their records, in '<prefix>:done' (task id
# by end time, trimmed to max_age by the workers; with none left, gone ttl >= max_age after
# its last write): a replay must find both gone to run.
DONE_OF = """
local function done_of(key)
  local prefix, task_id = string.match(key, '^(.*):r:([^:]+)$')
  if prefix then return prefix .. ':done', task_id end
  return nil, nil
end
"""
ENDED = with_parts(
    DONE_OF,
    """
local function ended(key)
  local done, task_id = done_of(key)
  if done == nil then return false end
  local score = redis.pcall('ZSCORE', done, task_id)
  return score ~= false and type(score) ~= 'table'  -- a table: an error (another type)
end
""",
)
# Remember the task at `key` as ended now. The set's expiry is pushed back to `ttl` unless
# `keep` is '0' (a worker settling tasks does it once a second: see WRITE_FINAL), and
# whenever the write replaced a key of another type. Returns whether the task was not
# there yet (false: it had ended before), as a look first would tell, in one command.
MARK_ENDED = with_parts(
    DONE_OF,
    ZADD_REPLACING,
    """
local function mark_ended(key, ttl, keep)
  local done, task_id = done_of(key)
  if not done then return true end
  local now = redis.call('TIME')
  local added, made = zadd_replacing(done, tonumber(now[1]) + tonumber(now[2]) / 1e6, task_id)
  if keep ~= '0' or made then redis.call('EXPIRE', done, ttl) end
  return added == 1
end
""",
)
# Whether `raw` (a record's `revoked` field) is a revoke of the task whose record is at
# `key`, as nbtask seals one (magic, version and header length: 8 bytes; then its type and
# id); its readers check its signature. A genuine revoke copied from another task's record
# names that task: it revokes nothing here.
REVOKES_TASK = with_parts(
    DONE_OF,
    """
local function revokes_task(raw, key)
  local id = string.match(string.sub(raw, 9, 200),
                          '^{"kind":"event","type":"revoked","id":"([^"]+)"')
  local _, task_id = done_of(key)
  return id ~= nil and id == task_id
end
""",
)
