"""The Lua script that hands a task's owed follow-ups to one process, once.

A task's follow-ups are its links and errbacks (and failing a chain's later steps). When
its outcome is stated by someone who does not send them (a revoke before it started, a
worker reporting it lost), its record says they are owed
(:data:`nbtask.wire.records.FOLLOW_UPS`), and the first process holding its message takes
them here, so they are sent once whoever replays the message.
"""

from __future__ import annotations

__all__ = ["FOLLOW_UP_SCRIPTS"]

# Take the follow-ups a stated outcome owes, once (nbtask.wire.records.FOLLOW_UPS).
# KEYS: record. Returns 1 (taken now), 0 (taken before), -1 (none owed, or no record).
_TAKE_FOLLOW_UPS = """
local owed = redis.pcall('HGET', KEYS[1], 'follow_ups')
if type(owed) == 'table' or not owed then return -1 end
if owed ~= 'owed' then return 0 end
redis.call('HSET', KEYS[1], 'follow_ups', 'taken')
return 1
"""

FOLLOW_UP_SCRIPTS = {"take_follow_ups": _TAKE_FOLLOW_UPS}
