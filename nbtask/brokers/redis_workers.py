"""The worker registry on Redis: heartbeats, dead workers, the versions workers run.

Keys, under ``<key_prefix>:``: ``workers`` (a hash of worker id -> :class:`WorkerInfo`
JSON), ``hb:<worker id>`` (a heartbeat, expiring after three intervals),
``reclaim:<worker id>`` (who cleans up a dead worker), ``versions:<worker id>`` and
``notebooks`` (a notebook session uses these workers: the modules of its settings).

Every client and worker reads the registry again and again: an entry larger than nbtask
writes one (``MAX_INFO_BYTES``) is never read, but deleted with one log line, and of a
registry holding more entries than nbtask writes (:data:`MAX_REGISTERED`) only that many
are read, those with a current heartbeat first (or, for the dead workers, without one).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence

from redis.exceptions import ResponseError

from nbtask.brokers.bounded_reads import read_bounded
from nbtask.brokers.redis_errors import is_wrong_type
from nbtask.brokers.redis_link import RedisLink
from nbtask.settings import Settings
from nbtask.wire.records import MAX_INFO_BYTES, WorkerInfo
from nbtask.wire.versions import MAX_VERSION_BYTES

__all__ = ["MAX_REGISTERED", "WORKER_SCRIPTS", "RedisWorkers"]

log = logging.getLogger(__name__)

#: The most entries of the worker registry a read takes: one per worker that runs (or died
#: and is not cleaned up yet), so a registry holding more was written by someone else.
MAX_REGISTERED = 1000
#: The registries this process said hold more entries than nbtask writes (and still do).
_SAID_OVERFULL: set[str] = set()


class RedisWorkers:
    """The worker-registry part of :class:`~nbtask.brokers.redis_store.RedisStore`."""

    link: RedisLink
    settings: Settings
    prefix: str
    ttl: int
    #: Whether "the registry is not a hash" was said and still holds: a client reads the
    #: registry every few seconds, and would say it at every read.
    _said_not_a_hash = False

    def _hb_key(self, worker_id: str) -> str:
        return f"{self.prefix}:hb:{worker_id}"

    @property
    def _workers_key(self) -> str:
        return f"{self.prefix}:workers"

    # Worker registry -------------------------------------------------------------------------
    def heartbeat(self, worker_id: str, info: WorkerInfo) -> None:
        """Announce a live worker for three heartbeats."""
        ttl_ms = int(3 * self.settings.heartbeat_interval * 1000)
        text = info.to_json()
        with self.link.translate_errors():
            pipe = self.link.redis.pipeline(transaction=False)
            pipe.set(self._hb_key(worker_id), text, px=ttl_ms)
            pipe.hset(self._workers_key, worker_id, text)
            pipe.expire(self._versions_key(worker_id), self.ttl)  # kept while it lives
            beat, listed, kept = pipe.execute(raise_on_error=False)
            for reply in (beat, kept):
                if isinstance(reply, ResponseError):
                    raise reply
            if isinstance(listed, ResponseError):  # else no worker would start
                if not is_wrong_type(listed):
                    raise listed
                self.link.hset_replacing(self._workers_key, worker_id, text)

    def unregister(self, worker_id: str) -> None:
        """Remove a stopped worker from the registry."""
        with self.link.translate_errors():
            pipe = self.link.redis.pipeline(transaction=False)
            pipe.delete(self._hb_key(worker_id), self._versions_key(worker_id))
            pipe.hdel(self._workers_key, worker_id)
            pipe.execute()

    def end_heartbeat(self, worker_id: str) -> None:
        """Show a stopped worker dead at once, keeping its entry for another to clean up.

        What it could not finish (a queue the broker still saw consumed) is then done by
        the next worker that cleans up after dead ones.
        """
        with self.link.translate_errors():
            self.link.redis.delete(self._hb_key(worker_id))

    def workers(self) -> dict[str, WorkerInfo]:
        """Workers whose heartbeat is current (unreadable entries are left out)."""
        live = self._registered(alive=True) or {}
        return {w: i for w, i in live.items() if i is not None}

    def workers_if_known(self) -> dict[str, WorkerInfo] | None:
        """Workers whose heartbeat is current; ``None`` if one's entry cannot be read.

        Or if the registry is not a hash, or holds more live entries than a read takes
        (:data:`MAX_REGISTERED`). Each was written by someone with write access to Redis,
        not by nbtask: what that live worker runs is then unknown, and a task it
        may run must not be taken for one no live worker runs.
        """
        live = self._registered(alive=True, whole=True)
        if live is None or None in live.values():
            return None
        return {w: i for w, i in live.items() if i is not None}

    def dead_workers(self) -> dict[str, WorkerInfo | None]:
        """Registered workers whose heartbeat lapsed (``None``: an unreadable entry)."""
        return self._registered(alive=False) or {}

    def _registered(
        self, *, alive: bool, whole: bool = False
    ) -> dict[str, WorkerInfo | None] | None:
        """The registered workers whose heartbeat is (or is not) current; ``None``: no hash.

        ``whole``: ``None`` too when there may be more of them than a read takes.
        """
        with self.link.translate_errors():
            dropped, entries, held, cut = self.link.call(
                "registered",
                [self._workers_key],
                MAX_INFO_BYTES,
                MAX_REGISTERED,
                self._hb_key(""),
                int(alive),
            )
            if dropped < 0:  # not a hash: nbtask did not write it
                if not self._said_not_a_hash:
                    log.error(
                        "the worker registry %s is not a hash; ignored until it is one (a "
                        "worker's heartbeat replaces it)",
                        self._workers_key,
                    )
                self._said_not_a_hash = True
                return None
            self._said_not_a_hash = False
            self._say_overfull(held)
            if dropped:  # read whole by every client and worker, again and again
                log.error(
                    "dropped %d entr(ies) of the worker registry larger than %s bytes (not "
                    "written by nbtask)",
                    dropped,
                    f"{MAX_INFO_BYTES:,}",
                )
            registered = {
                bytes(entries[i]): bytes(entries[i + 1]) for i in range(0, len(entries), 2)
            }
            names = {raw: _utf8(raw) for raw in registered}
            junk = [raw for raw, name in names.items() if name is None]
            if junk:  # an id nbtask never wrote: drop it, or it would be read forever
                log.error("dropped %d unreadable entr(ies) of the worker registry", len(junk))
                self.link.redis.hdel(self._workers_key, *junk)
            ids = [(raw, name) for raw, name in names.items() if name is not None]
            beats = self.link.redis.mget([self._hb_key(n) for _, n in ids]) if ids else []
        if whole and cut:
            return None
        return {
            name: WorkerInfo.parse(registered[raw])
            for (raw, name), beat in zip(ids, beats, strict=True)
            if bool(beat) is alive
        }

    def _say_overfull(self, held: int) -> None:
        """Say once per process (until it is back within bounds) that the registry holds too much.

        Once per process, not per store: a client may hold several, all reading it.
        """
        key = self._workers_key
        if not held:
            _SAID_OVERFULL.discard(key)
            return
        if key not in _SAID_OVERFULL:
            _SAID_OVERFULL.add(key)
            log.warning(
                "the worker registry %s holds %s entries, more than nbtask writes (one per "
                "worker, at most %s are read): someone else wrote them. Only that many "
                "are read, those with a current heartbeat first (live workers clean up "
                "after those without, a few at each heartbeat)",
                self._workers_key,
                f"{held:,}",
                f"{MAX_REGISTERED:,}",
            )

    def beats(self, worker_id: str) -> bool:
        """True if ``worker_id``'s heartbeat is current (it beat again since it lapsed)."""
        with self.link.translate_errors():
            return bool(self.link.redis.exists(self._hb_key(worker_id)))

    def claim_dead_worker(self, worker_id: str) -> bool:
        """Win the right to clean up ``worker_id`` for the next two heartbeats."""
        with self.link.translate_errors():
            lock = f"{self.prefix}:reclaim:{worker_id}"
            hold_ms = max(100, int(2000 * self.settings.heartbeat_interval))
            return bool(self.link.redis.eval(_CLAIM, 1, lock, hold_ms))

    def forget_worker(self, worker_id: str) -> None:
        """Drop a dead worker from the registry once its deliveries are handled."""
        with self.link.translate_errors():
            pipe = self.link.redis.pipeline(transaction=False)
            pipe.delete(self._versions_key(worker_id))
            pipe.hdel(self._workers_key, worker_id)
            pipe.execute()

    # Versions ------------------------------------------------------------------------------
    def _versions_key(self, worker_id: str) -> str:
        return f"{self.prefix}:versions:{worker_id}"

    def announce_versions(self, worker_id: str, versions: Mapping[str, str]) -> None:
        """Keep the versions a worker runs (for as long as its registry entry lives).

        Only those of at most :data:`MAX_VERSION_BYTES`: no longer one is read.
        """
        key = self._versions_key(worker_id)
        versions = {m: v for m, v in versions.items() if len(v.encode()) <= MAX_VERSION_BYTES}
        with self.link.translate_errors():
            pipe = self.link.redis.pipeline(transaction=True)
            pipe.delete(key)
            if versions:  # none found (the probe failed): nothing to keep
                pipe.hset(key, mapping=dict(versions))
                pipe.expire(key, self.ttl)
            pipe.execute()

    def versions(self, worker_id: str, modules: Sequence[str]) -> dict[str, str]:
        """The versions of ``modules`` a worker announced (those it has).

        The hash is anyone's to write: each version is read only up to
        :data:`MAX_VERSION_BYTES`, what a worker announces; a longer one (not written by
        nbtask) reads as absent, with one log line, as a key of another type does.
        """
        if not modules:
            return {}
        key = self._versions_key(worker_id)
        with self.link.translate_errors():
            found, over = read_bounded(self.link, key, dict.fromkeys(modules, MAX_VERSION_BYTES))
        if over:
            log.warning(
                "left out versions of %s longer than nbtask writes in %s (not nbtask's)",
                ", ".join(over)[:200],
                key,
            )
        return {
            module: value.decode("utf-8", "replace")
            for module in modules
            if isinstance(value := found.get(module.encode()), bytes)
        }

    # Notebook sessions --------------------------------------------------------------------
    @property
    def _notebooks_key(self) -> str:
        return f"{self.prefix}:notebooks"

    def note_notebook(self, modules: Sequence[str], seconds: float) -> None:
        """Say for ``seconds`` that a notebook session uses these workers.

        ``modules``: those its settings need (see :meth:`notebook_modules`).
        """
        with self.link.translate_errors():
            self.link.redis.set(self._notebooks_key, json.dumps(list(modules)), ex=int(seconds))

    def notebook_modules(self) -> list[str] | None:
        """The modules a live notebook session's settings need; ``None``: no session.

        Anyone with write access can set the key: a caller imports only modules it knows.
        """
        with self.link.translate_errors():
            try:
                raw = self.link.redis.get(self._notebooks_key)
            except ResponseError:  # another type: none nbtask wrote
                return None
        if not isinstance(raw, bytes):
            return None
        try:
            modules = json.loads(raw)
        except ValueError:
            return []
        return [m for m in modules if isinstance(m, str)] if isinstance(modules, list) else []


# The worker registry's entries, each read only if its id and value are no larger than
# nbtask writes them (ARGV[1] bytes): a larger one is deleted, since every client and
# worker would read it again and again. At most ARGV[2] entries are read: a registry
# holding more (HLEN: one command more on the usual path) was written by someone else, and
# of it only entries whose heartbeat (ARGV[3] .. id) is current are read when ARGV[4] is
# '1', only those whose heartbeat lapsed when it is '0'. KEYS: the registry. Returns
# {-1, {}, 0, 0} if it is not a hash, else {how many were deleted, {id, entry, ...},
# how many it held if more than ARGV[2] (else 0), 1 if entries were left unread as it
# read ARGV[2] (else 0)}.
_REGISTERED = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'none' then return {0, {}, 0, 0} end
if kind ~= 'hash' then return {-1, {}, 0, 0} end
local bound, most = tonumber(ARGV[1]), tonumber(ARGV[2])
local dropped, taken, out = 0, 0, {}
local function take(id)
  if #id > bound or redis.call('HSTRLEN', KEYS[1], id) > bound then
    redis.call('HDEL', KEYS[1], id)
    dropped = dropped + 1
    return
  end
  taken = taken + 1
  table.insert(out, id)
  table.insert(out, redis.call('HGET', KEYS[1], id))
end
local held = redis.call('HLEN', KEYS[1])
if held <= most then
  for _, id in ipairs(redis.call('HKEYS', KEYS[1])) do take(id) end
  return {dropped, out, 0, 0}
end
local alive = ARGV[4] == '1'
for _, id in ipairs(redis.call('HKEYS', KEYS[1])) do
  if (redis.call('EXISTS', ARGV[3] .. id) == 1) == alive then
    if taken >= most then return {dropped, out, held, 1} end
    take(id)
  end
end
return {dropped, out, held, 0}
"""

#: The worker registry's scripts (see RedisLink.add_scripts).
WORKER_SCRIPTS = {"registered": _REGISTERED}

# A claim nbtask made always expires: one without an expiry (of any type) was planted,
# and would keep the dead worker's work (on its processes' own queues) waiting forever.
_CLAIM = """
if redis.call('PTTL', KEYS[1]) == -1 then redis.call('DEL', KEYS[1]) end
return redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1])
"""


def _utf8(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
