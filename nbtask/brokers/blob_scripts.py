"""The Lua scripts that keep a blob's uses (:mod:`nbtask.brokers.redis_blobs`) atomic.

A blob's uses are a hash, ``<key_prefix>:blobref:<digest>``, kept as long as the blob:
a field ``k:<keeper>`` for each use that releases the blob when done with it (a kept
value, a task's arguments until the task has ended), and a field ``pin`` once anything
that relies on ``result_ttl`` used it (a task's result, a reference sent in a message).
Noting a use and checking whether the blob is there is one script, and so is a release,
so a blob is never deleted between a writer finding it kept and the writer's message
being read. A blob written in the background (a kept value's store copy) has a lease,
``<key_prefix>:blobwriting:<digest>``, from that script until the write is done, which
readers wait on.
"""

from __future__ import annotations

__all__ = ["BLOB_SCRIPTS"]

# KEYS[1]: the blob's uses (a hash); KEYS[2]: its write lease; KEYS[3..]: its chunks.
# ARGV[1]: the use's field, ARGV[2]: the TTL in seconds, ARGV[3]: a writer id ('' = the
# caller writes now), ARGV[4]: the lease's seconds, ARGV[5..]: each chunk's length. Notes
# the use, then refreshes the chunks: 1 when every chunk was there, 0 when the blob must be
# written (again). A writer that writes later takes the lease when there is something to
# write (without chunks, in shared memory, the caller looks: always). Anything but a hash
# at KEYS[1], or a chunk not a string of its length, was not written by nbtask: the hash
# is replaced, and the chunks are written again over it.
_USE_BLOB = """
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then redis.call('DEL', KEYS[1]) end
redis.call('HSET', KEYS[1], ARGV[1], 1)
redis.call('EXPIRE', KEYS[1], ARGV[2])
local whole = 1
for i = 3, #KEYS do
  if redis.call('TYPE', KEYS[i])['ok'] ~= 'string'
     or redis.call('STRLEN', KEYS[i]) ~= tonumber(ARGV[i + 2]) then
    whole = 0
  else
    redis.call('EXPIRE', KEYS[i], ARGV[2])
  end
end
if ARGV[3] ~= '' and (whole == 0 or #KEYS == 2) then
  redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
end
return whole
"""

# KEYS[1]: the blob's uses; KEYS[2]: its write lease; KEYS[3..]: its chunks. ARGV[1]: the
# writer id. A write made later is done: its lease goes (if still its own), and when every
# use was released meanwhile the blob goes too (returns 1), as a release would have done.
_WROTE_BLOB = """
-- pcall: another type there (not nbtask's) leaves it to its TTL.
if redis.pcall('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 3, #KEYS do redis.call('DEL', KEYS[i]) end
return 1
"""

# KEYS[1]: the blob's uses; KEYS[2..]: its chunks. ARGV[1]: a keeper's field. Removes
# that use; when it was there and was the last (no other keeper, no pin), deletes the
# blob and returns 1. A keeper not there (released already: a replay) changes nothing.
_RELEASE_BLOB = """
local removed = redis.pcall('HDEL', KEYS[1], ARGV[1])
if type(removed) ~= 'number' or removed == 0 then return 0 end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 2, #KEYS do redis.call('DEL', KEYS[i]) end
return 1
"""

BLOB_SCRIPTS = {"use_blob": _USE_BLOB, "wrote_blob": _WROTE_BLOB, "release_blob": _RELEASE_BLOB}
