"""The store's task scripts on Redis, and the Lua they share with the transport's.

Each step that must be atomic is one Lua script. The bookkeeping shared by both
transports is written once, as Lua functions the scripts are built from:
:data:`CHECK_START` (may a delivered task start?), :data:`WRITE_PENDING` (a task's record
when its message is sent) and :data:`WRITE_FINAL` (its record and event when it ends),
themselves built from the small ones of :mod:`nbtask.brokers.lua_parts` (a record's
state, the ended-task set, writes replacing a key nbtask did not write).
The store's scripts (:data:`STORE_SCRIPTS`) serve any transport;
:mod:`nbtask.brokers.streams_scripts` fuses the same steps with the Redis Streams
transport's own commands, so each step of a task is one round trip there. The scripts
taking a task's owed follow-ups, those of lost deliveries, the rate limit's and those of
messages parked until their due time (ETA sets) are in
:mod:`nbtask.brokers.follow_up_scripts`, :mod:`nbtask.brokers.lost_scripts`,
:mod:`nbtask.brokers.rate_scripts` and :mod:`nbtask.brokers.eta_scripts`.
"""

from __future__ import annotations

from nbtask.brokers.lua_parts import (
    ENDED,
    MARK_ENDED,
    NOTE_MOVED,
    OWN_RECORD,
    RECORD_STATE,
    REVOKES_TASK,
    SET_ASIDE,
    TEXT,
    XADD_KEEPING,
    XADD_REPLACING,
    ZADD_REPLACING,
    lua,
    waits_unstarted,
)
from nbtask.wire.records import MAX_REVOKE_BYTES

__all__ = [
    "CHECK_START",
    "EXPIRY_UPKEEP_SECONDS",
    "INDEX_UPKEEP_SECONDS",
    "PARKED_BEFORE",
    "STORE_SCRIPTS",
    "WRITE_FINAL",
    "WRITE_PENDING",
]

#: How often a client sending tasks trims its index of tasks (see WRITE_PENDING), seconds.
INDEX_UPKEEP_SECONDS = 1
#: How often a process settling tasks pushes back the expiry of the ended-task set and of
#: each client channel it writes to (see WRITE_FINAL), seconds.
EXPIRY_UPKEEP_SECONDS = 1

# May the task whose record is at `key` start now? A task starts only from PENDING or
# RETRY (or with no record, e.g. an expired one): duplicates of a running task, replays
# of a finished one and revoked tasks are refused. Returns 'OK' (and marks it STARTED by
# worker/pid/consumer) or the state that forbids it. Its client's signed revoke kept in
# the record (`revoked`, see _REVOKE) refuses first: it becomes the stored outcome, owing
# its follow-ups, and 'REVOKEDNOW' is returned (the worker tells the client). Only a
# revoke naming this task does: one naming another (copied from its record) is deleted.
# Lua cannot check its signature (anyone with write access can put one there): until the
# worker has, nothing is marked and 'KEPTREVOKE' is returned; the worker asks again with
# the revoke it checked (`vetted`) and whether it verified (`genuine` '1'). A forged one is
# deleted and the check goes on; one changed since it was read is handed back again. One
# larger than any nbtask writes (MAX_REVOKE_BYTES) is forged: deleted unread, and
# 'BIGREVOKE' is returned (the worker says so, and asks again). A final
# state refuses; so does a signed outcome, or a task remembered as ended, whatever the
# plain state says: 'FINISHED'. Only then is "STARTED by this very consumer process"
# weighed: it means its own earlier check, whose reply was lost with its connection (a
# consumer runs one task at a time, and is not running this one): 'OK'. A redelivered
# message (redelivered = '1') whose task is STARTED by someone else was lost by a dead
# holder: 'LOST'. A key of another type: 'BADRECORD'.
#
# A task whose message was put back (a retry parked, 'parked'; a Reject(requeue=True),
# 'requeued': "<retries>:<rejects>" of the copy put back) starts only from that copy or a
# later one: `copy` is the "<retries>:<rejects>" of the delivered message, read from its
# signed header once it verified. An earlier copy (a replay of one that ran already) is
# refused: 'SUPERSEDED'. Asked before the header is read (`copy` ''), such a task is
# neither marked nor refused: 'NOID', and the worker asks again once it verified.
CHECK_START = lua(
    ENDED,
    MARK_ENDED,
    REVOKES_TASK,
    TEXT,
    f"""
local MAX_REVOKE_BYTES = {MAX_REVOKE_BYTES}
""",
    """
-- Whether the copy "<retries>:<rejects>" is earlier than the last one put back.
local function superseded(copy, parked, requeued)
  local r, j = string.match(copy, '^(%d+):(%d+)$')
  if not r then return false end
  r, j = tonumber(r), tonumber(j)
  local p = tonumber(parked or '')
  if p and r < p then return true end
  local qr, qj = string.match(requeued or '', '^(%d+):(%d+)$')
  if not qr then return false end
  qr, qj = tonumber(qr), tonumber(qj)
  return r < qr or (r == qr and j < qj)
end
local function check_start(key, ttl, worker, pid, consumer, redelivered, copy, vetted, genuine)
  local got = redis.pcall('HMGET', key, 'state', 'result', 'revoked', 'parked', 'requeued')
  if got.err then return 'BADRECORD' end
  local state, outcome, revoked = got[1], got[2], got[3]
  if revoked and #revoked > MAX_REVOKE_BYTES then
    redis.call('HDEL', key, 'revoked')
    return 'BIGREVOKE'
  end
  if revoked and (not revokes_task(revoked, key) or (revoked == vetted and genuine ~= '1')) then
    -- Not this task's (copied from another's record), or its signature is forged: it
    -- revokes nothing.
    redis.call('HDEL', key, 'revoked')
    revoked = false
  end
  if revoked and not outcome and not ended(key) then
    if revoked ~= vetted then return 'KEPTREVOKE' end
    redis.call('HSET', key, 'state', 'REVOKED', 'result', revoked, 'follow_ups', 'owed')
    redis.call('EXPIRE', key, ttl)
    mark_ended(key, ttl)
    return 'REVOKEDNOW'
  end
  if state and not """
    + waits_unstarted("state")
    + """ and state ~= 'STARTED' then
    return state
  end
  -- Signed facts first: the plain fields naming who started a task are anyone's to
  -- write (the worker registry lists every consumer, pid and host).
  if outcome or ended(key) then return 'FINISHED' end
  if state == 'STARTED' then
    local by = redis.call('HMGET', key, 'worker', 'pid', 'consumer')
    if by[1] == worker and by[2] == pid and by[3] == consumer then return 'OK' end
    if redelivered == '1' then return 'LOST' end
    return state
  end
  if got[4] or got[5] then
    if not copy or copy == '' then return 'NOID' end
    if superseded(copy, got[4], got[5]) then return 'SUPERSEDED' end
  end
  local now = redis.call('TIME')
  redis.call('HSET', key, 'state', 'STARTED', 'worker', worker, 'pid', pid,
             'consumer', consumer,
             'started_at', text(tonumber(now[1]) + tonumber(now[2]) / 1e6))
  redis.call('EXPIRE', key, ttl)
  return 'OK'
end
""",
)

# Write the PENDING record of a task being sent, and note it among its client's tasks
# (`index`, '' for none). Task ids are single-use: a task that has a record (queued,
# running, waiting to retry, or final: revoked before a worker sent a chain's next step,
# or an id reused) stays as it is, and its state is returned; else ''. An id its sender
# has just drawn at random (`new` = '1': no reply is awaited, so no refusal could be
# told) cannot be held by any task: it is written without the full look (one command
# less per delay()). Where the message goes apart (RabbitMQ: `with_message` false), its
# state is still written only where there is none: Redis, which runs what several
# connections sent in the order it reads them, may run the worker's start check (or the
# task's end) first, and PENDING over it would make the running task look unstarted (a
# revoke would not stop it). Its other fields then fill in only what is missing: a retry
# onto another queue has named that queue already. A copy sent again there (its
# connection dropped, or Redis lost its scripts) is written the same way: the message
# left whatever Redis says. A Streams publish queues the message in the same script:
# nothing can have started it, and a copy it sends again looks (redis_owed.looking: `new`
# is ARGV[7] of every script calling this), as its first may have queued the message.
# The index is
# trimmed to `ttl` and its expiry pushed back unless `upkeep` is '0': a client sending
# many tasks does that once every INDEX_UPKEEP_SECONDS, and the index is kept that much
# longer than `ttl` so it never goes before the newest task it names.
WRITE_PENDING = lua(
    OWN_RECORD,
    ENDED,
    ZADD_REPLACING,
    """
local function write_pending(key, ttl, index, now, task_id, fields, upkeep, new, with_message)
  if new ~= '1' then
    local state, outcome = own_record(key)
    if state then return state end
    if outcome or ended(key) then return 'FINISHED' end
  elseif not with_message then
    for i = 1, #fields, 2 do
      if fields[i] == 'state' then
        if redis.call('HSETNX', key, 'state', fields[i + 1]) == 0 then
          -- Written first by another (a start check, an end, a revoke): each field only
          -- where it is missing (a retry onto another queue named it already).
          for j = 1, #fields, 2 do redis.call('HSETNX', key, fields[j], fields[j + 1]) end
          fields = {}
        end
        break
      end
    end
  end
  if #fields > 0 then redis.call('HSET', key, unpack(fields)) end
  redis.call('EXPIRE', key, ttl)
  if index ~= '' then
    -- Another type there was not written by nbtask, and would stop every send.
    zadd_replacing(index, now, task_id)
    if upkeep ~= '0' then
      redis.call('ZREMRANGEBYSCORE', index, '-inf', tonumber(now) - tonumber(ttl))
      redis.call('EXPIRE', index, math.ceil(tonumber(ttl)) + """
    + str(2 * INDEX_UPKEEP_SECONDS)
    + """)
    end
  end
  return ''
end
""",
)

# The end of a task (or a retry): store its record (no fields and an event: delete it)
# and append the event to its client's channel. A field value '=event' stands for the
# event itself (a stored result), so it is sent only once. A task ends once: a second
# outcome (a worker reported the task lost, then it ended after all) is neither stored nor
# sent, but remembered as ended. Only what nbtask writes as a task ends refuses it: the
# record's signed outcome (its final event) or the ended-task set. A final plain state
# alone, or another event as its result, was put there by someone else: written over.
# Returns '' once written, '!' .. the plain state it wrote over, else what refused it:
# the record's final state (held with its outcome), or 'ENDED'; and second, the id the
# event was kept under on the channel ('' if it was not).
#
# The ended-task set and the channel live `ttl` (and a little: EXPIRY_UPKEEP_SECONDS twice)
# past their last write, but a process settling many tasks pushes their expiry back only
# once every EXPIRY_UPKEEP_SECONDS (`keep_done`, `keep_channel`: '1' then, else '0'; its
# done flag only on a settle that ends the task, which always marks it ended), so none goes
# before the newest entry it holds: two commands less per task. A channel this write makes
# anew still gets its expiry (XADD_KEEPING); so does an ended-task set that replaced a key
# of another type, and the workers' housekeeping gives one to a set left without
# (_FORGET_ENDED).
WRITE_FINAL = lua(
    OWN_RECORD,
    ENDED,
    MARK_ENDED,
    XADD_KEEPING,
    """
-- Compared, not looked up in a table: a table would be built anew on every run.
local function final(state)
  return state == 'SUCCESS' or state == 'FAILURE' or state == 'REVOKED' or state == 'WORKER_LOST'
end
-- Whether `raw` is this task's final event as nbtask seals one (magic, version and header
-- length: 8 bytes; then its type and id). Its readers check its signature.
local function ends_task(raw, key)
  if not raw then return false end
  local kind, id = string.match(string.sub(raw, 9, 200),
                                '^{"kind":"event","type":"([a-z_]+)","id":"([^"]+)"')
  local _, task_id = done_of(key)
  return (kind == 'success' or kind == 'failure' or kind == 'revoked' or kind == 'worker_lost')
         and id == task_id
end
local function write_final(key, channel, ttl, maxlen, event, fields, keep_done, keep_channel)
  local ends = false
  for i = 2, #fields, 2 do
    if fields[i] == '=event' then fields[i] = event end
    if fields[i - 1] == 'state' and final(fields[i]) then ends = true end
  end
  local state, outcome = own_record(key)
  outcome = ends_task(outcome, key)
  local kept_ttl = math.ceil(tonumber(ttl)) + """
    + str(2 * EXPIRY_UPKEEP_SECONDS)
    + """
  -- Marked ended whether or not it is refused (this run too: its entry may have gone);
  -- whether it was there already is the mark's own reply.
  local ended_before
  if ends then
    ended_before = not mark_ended(key, kept_ttl, keep_done)
  elseif not outcome then
    ended_before = ended(key)
  end
  if outcome or ended_before then
    if keep_channel == '1' and channel ~= '' then redis.call('EXPIRE', channel, kept_ttl) end
    return (outcome and final(state)) and state or 'ENDED'
  end
  if #fields > 0 then
    redis.call('HSET', key, unpack(fields))
    redis.call('EXPIRE', key, ttl)
  elseif event ~= '' then
    redis.call('DEL', key)
  end
  local kept = ''
  if event ~= '' and channel ~= '' then
    kept = xadd_keeping(channel, maxlen, event, kept_ttl, keep_channel)
  end
  return final(state) and ('!' .. state) or '', kept
end
""",
)

# A retry is parked once per task and retry number: its record names the last one parked
# (the 'parked' field, among the retry's own fields: nbtask.wire.records.PARKED). The same
# retry's end sent again (its reply lost with its connection, after Redis ran it) finds it
# there: it is neither told nor parked again (the ETA mover may have queued the first).
PARKED_BEFORE = """
local function parked_before(key, fields)
  for i = 1, #fields - 1, 2 do
    if fields[i] == 'parked' then return redis.pcall('HGET', key, 'parked') == fields[i + 1] end
  end
  return false
end
"""

# Store scripts ------------------------------------------------------------------------------

# KEYS: record; ARGV: ttl, worker, pid, consumer, redelivered, copy ('' = not read yet),
# vetted (the kept revoke the worker checked, '' = none), genuine ('1' = it verified)
_START = (
    CHECK_START
    + """
return check_start(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7],
                   ARGV[8])
"""
)

# Write a PENDING record, and park the message until its ETA (member '' = not parked).
# KEYS: record, eta set, client index
# ARGV: ttl, now, task id, due, member, index upkeep ('0' = not now), new ('1' = an id
# just drawn), fields...
_RECORD = (
    WRITE_PENDING
    + """
local refused = write_pending(KEYS[1], ARGV[1], KEYS[3], ARGV[2], ARGV[3], {unpack(ARGV, 8)},
                              ARGV[6], ARGV[7])
if refused ~= '' then return refused end
if ARGV[5] ~= '' then zadd_replacing(KEYS[2], ARGV[4], ARGV[5]) end
return ''
"""
)

# A task's end, told to its client and stored, and a retry parked until it is due (once:
# the same retry sent again is not, see PARKED_BEFORE). Returns {what refused it, as
# WRITE_FINAL says, or ''; the id its event was kept under on the channel, or ''}.
# KEYS: record, channel, eta set; ARGV: ttl, maxlen, event, member ('' = none), due,
# keep_done, keep_channel (see WRITE_FINAL), fields...
_SETTLE = (
    WRITE_FINAL
    + PARKED_BEFORE
    + """
local fields = {unpack(ARGV, 8)}
if parked_before(KEYS[1], fields) then return {'', ''} end
local refused, kept = write_final(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], fields,
                                  ARGV[6], ARGV[7])
if ARGV[4] ~= '' then zadd_replacing(KEYS[3], ARGV[5], ARGV[4]) end
return {refused, kept or ''}  -- (a nil would end the list)
"""
)

# Mark a task that has not started REVOKED and tell its client. Its signed outcome owes
# its follow-ups (errbacks, failing a chain's later steps): the first worker that drops its
# message takes them, once (nbtask.wire.records.FOLLOW_UPS); a replay finds them taken.
# Returns the id the event was kept under on the channel, or 0 if it ended (a signed
# outcome, the ended-task set). One whose plain state says it started may run, or someone
# else wrote that: the client's signed revoke is kept (`revoked`) and refuses its next
# start (CHECK_START): 2.
# KEYS: record, channel; ARGV: event, ttl, maxlen
_REVOKE = lua(
    OWN_RECORD,
    ENDED,
    MARK_ENDED,
    XADD_REPLACING,
    """
local state, outcome = own_record(KEYS[1])
if outcome or ended(KEYS[1]) then return 0 end
if state and not """
    + waits_unstarted("state")
    + """ then
  redis.call('HSET', KEYS[1], 'revoked', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return 2
end
mark_ended(KEYS[1], ARGV[2])
redis.call('HSET', KEYS[1], 'state', 'REVOKED', 'result', ARGV[1], 'follow_ups', 'owed')
redis.call('EXPIRE', KEYS[1], ARGV[2])
local kept = xadd_replacing(KEYS[2], ARGV[3], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return kept
""",
)

# Forget ended tasks that ended before ARGV[1] (their messages are too old to run). A set
# left without an expiry gets ARGV[2]: one a settle made anew within the second its process
# last pushed the expiry back (someone deleted it; see WRITE_FINAL). One with an expiry
# keeps it: with none left, the set goes that long after its last write.
# KEYS: ended-task set. Returns 1 if it was of another type and was set aside, else 0.
_FORGET_ENDED = (
    SET_ASIDE
    + """
local aside = set_aside(KEYS[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('TTL', KEYS[1]) == -1 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return aside
"""
)

# Make room for a sorted set (an ETA set a large message is parked in without a
# script). KEYS: the key. Returns 1 if it held another type, else 0.
_SET_ASIDE = SET_ASIDE + "return set_aside(KEYS[1])\n"

# A record without a client was written by a start check alone, for a task id that came
# beside a message no client sent (it then failed verification): delete it. KEYS: record
_FORGET_UNSENT = (
    RECORD_STATE
    + """
if record_state(KEYS[1]) == 'bad' then return 0 end
if redis.call('HEXISTS', KEYS[1], 'client') == 0 then return redis.call('DEL', KEYS[1]) end
return 0
"""
)

# Delete the PENDING record of a task whose message was never queued after all, and its
# entry in its client's index. A record a start check (or a revoke, an end) wrote since
# stays: the broker may have taken the message though its answer was lost, and a worker
# runs the task. KEYS: record, client index ('' for none); ARGV: task id
_FORGET_PENDING = (
    RECORD_STATE
    + """
local state = record_state(KEYS[1])
if state and state ~= 'PENDING' then return 0 end
redis.call('DEL', KEYS[1])
if KEYS[2] ~= '' then redis.pcall('ZREM', KEYS[2], ARGV[1]) end
return 1
"""
)

# A task whose message waiting on a gone process's own queue was moved to another: its
# record names that queue (see NOTE_MOVED). KEYS: record; ARGV: queue.
_MOVED = lua(NOTE_MOVED, "return note_moved(KEYS[1], ARGV[1])\n")

STORE_SCRIPTS = {
    "start": _START,
    "record": _RECORD,
    "settle": _SETTLE,
    "revoke": _REVOKE,
    "forget_ended": _FORGET_ENDED,
    "set_aside": _SET_ASIDE,
    "forget_unsent": _FORGET_UNSENT,
    "forget_pending": _FORGET_PENDING,
    "moved": _MOVED,
}
