"""The Lua script that hands a task's owed follow-ups to one process, once.

A task's follow-ups are its links and errbacks (and failing a chain's later steps). When
its outcome is stated by someone who does not send them (a revoke before it started, a
worker reporting it lost), its record says they are owed
(:data:`nbtask.wire.records.FOLLOW_UPS`), and the first process holding its message takes
them here, so they are sent once whoever replays the message. A take names its taker, so
that one sent again after its reply was lost is not refused as another's.
"""

from __future__ import annotations

__all__ = ["FOLLOW_UP_SCRIPTS"]

# Take the follow-ups a stated outcome owes, once (nbtask.wire.records.FOLLOW_UPS). The
# field then names its taker: that taker's take sent again (its reply lost with its
# connection, after Redis ran it) takes them again; anyone else's (a replay) finds them
# taken. KEYS: record; ARGV: taker.
# Returns 1 (taken now, or by this taker), 0 (taken by another), -1 (none owed, no record).
_TAKE_FOLLOW_UPS = """
local owed = redis.pcall('HGET', KEYS[1], 'follow_ups')
if type(owed) == 'table' or not owed then return -1 end
local mine = 'taken:' .. ARGV[1]
if owed == mine then return 1 end
if owed ~= 'owed' then return 0 end
redis.call('HSET', KEYS[1], 'follow_ups', mine)
return 1
"""

FOLLOW_UP_SCRIPTS = {"take_follow_ups": _TAKE_FOLLOW_UPS}
