"""Blobs in the store: large values sent out of band (:mod:`nbtask.wire.blobs`), on Redis.

A blob is kept as ``<key_prefix>:blob:<digest>:<n>`` keys, each a chunk of at most
:data:`CHUNK_BYTES` (a Redis string holds at most 512 MB, and a chunk read at a time keeps
a reader's peak memory near the blob's own size), for ``result_ttl``. When every user of
the store shares this host, blobs go through shared memory instead
(:mod:`nbtask.brokers.local_blobs`). Blobs are named by
their content, so a blob already kept is not sent again: its expiry is refreshed instead.

A blob is shared by every use of the same bytes (anyone's), so it is deleted before
``result_ttl`` only when no use needs it any more. Each write notes its use in
``<key_prefix>:blobref:<digest>`` (:mod:`nbtask.brokers.blob_scripts`), in the same
script that finds whether the blob is kept:

* a kept value (``keeper=``, a random id made for that value alone) notes itself;
* a task's arguments note the task (:func:`~nbtask.wire.blobs.argument_keeper`), which
  its worker releases once the task has ended;
* anything else (a task's result, a reference to a kept value sent in a message:
  :meth:`RedisBlobs.pin_blobs`) pins the blob, which then stays ``result_ttl``.

:meth:`RedisBlobs.release_blobs` removes a keeper; the blob goes when that was its last
use and nothing pinned it. A keeper already removed changes nothing, so releasing twice
(or releasing a value kept again since, under a new keeper) never deletes what another
use needs. Both stores keep these notes in Redis (the store is always Redis): a blob in
shared memory is removed from its file once Redis says it may go.

A kept value's store copy may be written later (``later=True``: the process keeping it
holds it live, and the cell's outcome need not wait for hundreds of megabytes to reach
Redis). From the moment its use is noted until it is written, its lease
(``<key_prefix>:blobwriting:<digest>``, renewed as each chunk or file of its process's
background writes goes, its own or one before it in the queue, gone
:attr:`RedisBlobs.lease_seconds` after its writer stopped) says it is coming: a reader
waits for it instead of finding it missing, and :meth:`RedisBlobs.has_blobs` says it is
not whole yet.

A sealed blob (:mod:`nbtask.wire.blobs`: a kept value's blob named by a random id) is
stored as its bytes followed by its seal, which ``put_blobs(..., seal=)`` computes where it
writes: in the background for a copy written later, so the hash is off the cell's path.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from nbtask.brokers.later_writes import LaterWrites
from nbtask.brokers.local_blobs import LocalBlobs, Stored, pieces
from nbtask.brokers.redis_link import RedisLink
from nbtask.errors import BlobError, BlobGone, BrokerUnavailable
from nbtask.settings import Settings
from nbtask.wire.blobs import SEAL_BYTES, ByteProgress
from nbtask.wire.envelope import Buffer

__all__ = ["CHUNK_BYTES", "RedisBlobs"]

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024 * 1024
#: Blobs asked to be written later are, from this many bytes in all (smaller ones go now).
LATER_BYTES = 32 * 1024 * 1024
#: Returns the seal stored after a sealed blob's bytes: ``seal(id, data)``.
Seal = Callable[[str, Buffer], bytes]


class RedisBlobs:
    """The blob part of :class:`~nbtask.brokers.redis_store.RedisStore`."""

    link: RedisLink
    settings: Settings
    prefix: str
    ttl: int
    #: Blobs on this host, through shared memory, when every user of the store is here.
    local_blobs: LocalBlobs | None = None
    #: The size of a blob's chunks (a class attribute, so tests can make it small).
    chunk_bytes: int = CHUNK_BYTES
    #: From how many bytes ``put_blobs(..., later=True)`` writes in the background.
    later_bytes: int = LATER_BYTES
    #: Seconds a write lease lasts unless its writer renews it (at each chunk).
    lease_seconds: int = 10
    #: Seconds a background write is tried again while the store is unreachable.
    retry_seconds: float = 60.0
    #: A reader waits this long at most for a blob being written: a lease someone who can
    #: write to the store keeps renewing (without the blob) must not hold it for good.
    wait_seconds: float = 120.0
    _later: LaterWrites | None = None

    def _blob_keys(self, digest: str, size: int) -> list[str]:
        count = max(1, -(-size // self.chunk_bytes))
        return [f"{self.prefix}:blob:{digest}:{i}" for i in range(count)]

    def _uses_key(self, digest: str) -> str:
        return f"{self.prefix}:blobref:{digest}"

    def _lease_key(self, digest: str) -> str:
        return f"{self.prefix}:blobwriting:{digest}"

    def put_blobs(
        self,
        blobs: Mapping[str, Buffer],
        keeper: str | None = None,
        *,
        later: bool = False,
        seal: Seal | None = None,
    ) -> None:
        """Keep ``{digest: bytes}`` for ``result_ttl`` (sending only those not kept yet).

        ``keeper``: the id of the use these blobs serve (a kept value, a task's
        arguments), which :meth:`release_blobs` may delete them for; without one they
        are pinned. ``later``: the caller holds the value live, so from
        :attr:`later_bytes` on the blobs are written by a thread of this process once
        :meth:`start_writes` is called (readers wait for them meanwhile; :meth:`finish_writes`).
        ``seal``: the blobs are sealed (named by id): each is stored followed by
        ``seal(id, bytes)`` (:data:`~nbtask.wire.blobs.SEAL_BYTES` long), computed as it is
        written.
        """
        if not blobs:
            return
        extra = SEAL_BYTES if seal is not None else 0
        sizes = {digest: len(data) + extra for digest, data in blobs.items()}
        writer = secrets.token_hex(8) if later and self.writes_later(sum(sizes.values())) else ""
        whole = self._use(sizes, keeper, writer)
        # In shared memory, the files are looked at as they are written.
        local = self.local_blobs is not None
        missing = {digest: data for digest, data in blobs.items() if local or not whole[digest]}
        if not writer:
            self._write(_sealed(missing, seal))
        elif missing:
            if self._later is None:
                self._later = LaterWrites()
            leases = [self._lease_key(digest) for digest in missing]
            job = functools.partial(self._write_later, missing, writer, seal)
            self._later.submit(job, leases)

    def writes_later(self, size: int) -> bool:
        """Whether ``put_blobs(..., later=True)`` of ``size`` bytes writes in the background."""
        return size >= self.later_bytes

    def holds_writes(self) -> bool:
        """Whether blobs given to be written in the background wait for :meth:`start_writes`."""
        return self._later is not None and self._later.holding

    def start_writes(self) -> None:
        """Start writing the blobs given to be written in the background (the outcome is out)."""
        if self._later is not None:
            self._later.start()

    def finish_writes(self, timeout: float | None = None) -> bool:
        """Start and wait for the blobs written in the background; whether all are written."""
        return self._later is None or self._later.wait(timeout)

    def _write(self, blobs: Mapping[str, Stored], *, renew: bool = False) -> None:
        """Write ``blobs`` (to shared memory, or chunk by chunk to Redis).

        ``renew``: a background write, which renews the leases of every write of this
        process still to be done (its own, and those queued behind it) at each file or
        chunk, in the same round trip as the chunk: a write waiting its turn is alive too.
        """
        if self.local_blobs is not None:
            no_room: dict[str, Stored] = {}
            for digest, data in blobs.items():
                if renew:
                    self._run_writes(self._renewals())
                no_room.update(self.local_blobs.put({digest: data}))
            # Read from the store when their files are missing (see get_blob).
            blobs = no_room
        writes: list[tuple[object, ...]] = []
        for digest, data in blobs.items():
            views = [memoryview(piece).cast("B") for piece in pieces(data)]
            for i, key in enumerate(self._blob_keys(digest, sum(v.nbytes for v in views))):
                chunk = _chunk_of(views, i * self.chunk_bytes, (i + 1) * self.chunk_bytes)
                writes.append(("SET", key, chunk, "EX", self.ttl))
                if renew:  # one round trip per chunk: the leases renewed are read anew
                    self._run_writes([*writes, *self._renewals()])
                    writes = []
        self._run_writes(writes)

    def _renewals(self) -> list[tuple[object, ...]]:
        leases = self._later.leases() if self._later is not None else []
        return [("EXPIRE", lease, self.lease_seconds) for lease in leases]

    def _run_writes(self, writes: list[tuple[object, ...]]) -> None:
        if writes:
            with self.link.translate_errors():
                self.link.run(writes, large=True)

    def _write_later(self, blobs: Mapping[str, Buffer], writer: str, seal: Seal | None) -> None:
        """Seal (if asked) and write ``blobs`` in the background, then give back their leases."""
        extra = SEAL_BYTES if seal is not None else 0
        try:
            self._write_again_while_unreachable(_sealed(blobs, seal, self._renew_leases), writer)
        finally:
            digests = list(blobs)
            commands = [
                self.link.evalsha(
                    "wrote_blob",
                    [
                        self._uses_key(digest),
                        self._lease_key(digest),
                        *self._chunk_keys_here(digest, len(blobs[digest]) + extra),
                    ],
                    writer,
                )
                for digest in digests
            ]
            with self.link.translate_errors():
                replies = self.link.run_scripts(commands)
            # Released meanwhile: the blob goes, as the release would have done.
            for digest, reply in zip(digests, replies, strict=True):
                if reply and self.local_blobs is not None:
                    self.local_blobs.remove(digest, functools.partial(self._in_use, digest))

    def _renew_leases(self) -> None:
        """Renew this process's leases now (before a blob's hash, in the background).

        Hashing takes about a second a gigabyte, and the leases are otherwise renewed only
        as chunks are written: a reader must not take a value being sealed for lost.
        """
        # Unreachable: the write that follows tries again, and takes the leases anew.
        with contextlib.suppress(BrokerUnavailable):
            self._run_writes(self._renewals())

    def _write_again_while_unreachable(self, blobs: Mapping[str, Stored], writer: str) -> None:
        """Write ``blobs``, again while the store is unreachable, for :attr:`retry_seconds`.

        A Redis restart or failover must not lose a copy its process still holds (no
        cell failed: no one would know). Each try takes the leases again first: they
        lapsed meanwhile.
        """
        deadline = time.monotonic() + self.retry_seconds
        pause, again = 0.5, False
        while True:
            try:
                if again:
                    leases = [self._lease_key(digest) for digest in blobs]
                    self._run_writes([("SET", k, writer, "EX", self.lease_seconds) for k in leases])
                self._write(blobs, renew=True)
                return
            except BrokerUnavailable as exc:
                if time.monotonic() + pause > deadline:
                    raise
                log.warning("could not write a store copy (%s); trying again in %.1f s", exc, pause)
            time.sleep(pause)
            pause, again = min(pause * 2, 5.0), True

    def _chunk_keys_here(self, digest: str, size: int) -> list[str]:
        """The keys a blob's chunks have in Redis (none when blobs go to shared memory)."""
        return self._blob_keys(digest, size) if self.local_blobs is None else []

    def pin_blobs(self, sizes: Mapping[str, int]) -> None:
        """Keep the blobs ``{digest: size}`` (a message refers to them) a full ``result_ttl``."""
        if not sizes:
            return
        self._use(sizes, None)
        if self.local_blobs is not None:
            self.local_blobs.touch(sizes)

    def _use(
        self, sizes: Mapping[str, int], keeper: str | None, writer: str = ""
    ) -> dict[str, bool]:
        """Note a use of each blob and refresh it: whether it is kept whole in Redis.

        ``writer``: the id of a write made later, which takes the leases of the blobs
        it must write.
        """
        field = "pin" if keeper is None else _keeper_field(keeper)
        commands = []
        for digest, size in sizes.items():
            keys = self._chunk_keys_here(digest, size)
            lengths = [min(self.chunk_bytes, size - i * self.chunk_bytes) for i in range(len(keys))]
            commands.append(
                self.link.evalsha(
                    "use_blob",
                    [self._uses_key(digest), self._lease_key(digest), *keys],
                    field,
                    self.ttl,
                    writer,
                    self.lease_seconds,
                    *lengths,
                )
            )
        with self.link.translate_errors():
            replies = self.link.run_scripts(commands)
        return {digest: bool(reply) for digest, reply in zip(sizes, replies, strict=True)}

    def release_blobs(self, released: Mapping[str, Mapping[str, int]]) -> list[str]:
        """Remove keepers, ``{keeper: {digest: size}}``; delete the blobs no use needs now.

        Returns the digests deleted.
        """
        order = [(keeper, digest) for keeper, sizes in released.items() for digest in sizes]
        if not order:
            return []
        commands = [
            self.link.evalsha(
                "release_blob",
                [self._uses_key(digest), *self._blob_keys(digest, released[keeper][digest])],
                _keeper_field(keeper),
            )
            for keeper, digest in order
        ]
        with self.link.translate_errors():
            replies = self.link.run_scripts(commands)
        deleted = [digest for (_, digest), reply in zip(order, replies, strict=True) if reply]
        if self.local_blobs is not None:
            for digest in deleted:
                self.local_blobs.remove(digest, functools.partial(self._in_use, digest))
        return deleted

    def _in_use(self, digest: str) -> bool:
        with self.link.translate_errors():
            return bool(self.link.redis.exists(self._uses_key(digest)))

    def has_blobs(self, sizes: Mapping[str, int]) -> bool:
        """Whether :meth:`get_blob` finds every blob ``{digest: size}`` whole now.

        Files in shared memory are looked at first; the rest is one ``EXISTS`` of their
        chunks (a blob found now may still expire before it is read).
        """
        local = self.local_blobs
        keys = [
            key
            for digest, size in sizes.items()
            if local is None or not local.has(digest, size)
            for key in self._blob_keys(digest, size)
        ]
        if not keys:
            return True
        with self.link.translate_errors():
            return int(self.link.redis.exists(*keys)) == len(keys)

    def get_blob(self, digest: str, size: int, progress: ByteProgress | None = None) -> Buffer:
        """A blob's bytes (mapped from shared memory, or read chunk by chunk from Redis).

        ``progress`` is told the bytes of each chunk as it arrives (of a mapped blob, all
        at once). A blob being written in the background is waited for.

        Raises
        ------
        BlobError
            The blob is not kept (it expired, or was deleted, or its writer stopped before
            the end) or has the wrong size.
        """
        deadline = time.monotonic() + self.wait_seconds
        if self.local_blobs is not None:
            mapped = self._wait_for(digest, size, deadline, lambda: self._mapped(digest, size))
            if mapped is not None:
                if progress is not None:
                    progress(size)
                return mapped
        data = bytearray(size)
        at = 0
        with self.link.translate_errors():
            for key in self._blob_keys(digest, size):
                read = functools.partial(self._chunk, key, digest, size)
                chunk = self._wait_for(digest, size, deadline, read)
                if chunk is None:
                    raise BlobGone(
                        f"a large value ({size:,} bytes, blob {digest[:16]}) is no longer in "
                        f"the store: it expired (values are kept result_ttl, "
                        f"{self.ttl:,} s), was deleted, or the worker writing it stopped "
                        "first or could not write it (the worker's log says why)"
                    )
                if at + len(chunk) > size:
                    break
                data[at : at + len(chunk)] = chunk
                at += len(chunk)
                if progress is not None:
                    progress(len(chunk))
        if at != size:
            raise BlobError(_ALTERED.format(digest=digest[:16], size=size))
        return data

    def _mapped(self, digest: str, size: int) -> Buffer | None:
        assert self.local_blobs is not None
        return self.local_blobs.get(digest, size)

    def _chunk(self, key: str, digest: str, size: int) -> Buffer | None:
        # One byte past a chunk at most: a longer string (not nbtask's) is refused without
        # being read whole. Missing reads as empty, and no chunk is empty.
        read = functools.partial(self.link.redis.getrange, key, 0, self.chunk_bytes)
        try:
            try:
                chunk: bytes = read()
            except RedisConnectionError:
                # A connection dropped under a read (a blip, a proxy's idle cut) fails a
                # large value's load, which takes many reads, far more often than a send:
                # a read changes nothing, so once more on a new connection. Not after a
                # timeout: a stalled server would be waited for twice.
                chunk = read()
        except ResponseError as exc:  # not a string: nbtask did not write it
            raise BlobError(_ALTERED.format(digest=digest[:16], size=size)) from exc
        return chunk or None

    def _wait_for(
        self, digest: str, size: int, deadline: float, read: Callable[[], Buffer | None]
    ) -> Buffer | None:
        """``read()``, again while the blob's lease says it is being written.

        The writer gives the lease back only after its last chunk, so a read after the
        lease is gone sees every chunk. Waiting polls (from 5 ms to 0.1 s apart): it
        happens only to a reader that came while the value's worker still writes it, and
        ends at ``deadline`` (monotonic) with a :class:`BlobError`.
        """
        pause = 0.005
        while True:
            if time.monotonic() > deadline:
                raise BlobError(
                    f"a large value ({size:,} bytes, blob {digest[:16]}) is still marked as "
                    f"being written after {self.wait_seconds:,.0f} s: the worker writing it "
                    "is stuck, or someone who can write to the store keeps its lease; "
                    "nothing was loaded"
                )
            found = read()
            if found is not None:
                return found
            with self.link.translate_errors():
                left_ms = int(self.link.redis.pttl(self._lease_key(digest)))
            # A lease lasts lease_seconds at most: a key that never expires, or later,
            # was not written by nbtask, and must not keep a reader waiting.
            if not 0 < left_ms <= self.lease_seconds * 1000:
                return read()
            time.sleep(pause)
            pause = min(pause * 2, 0.1)


_ALTERED = (
    "blob {digest} in the store is not {size:,} bytes long (it was altered or truncated); "
    "nothing was loaded"
)


def _sealed(
    blobs: Mapping[str, Buffer],
    seal: Seal | None,
    before_each: Callable[[], None] = lambda: None,
) -> Mapping[str, Stored]:
    """What is written for ``blobs``: with ``seal``, each one's bytes and then its seal.

    ``before_each`` is called before each blob is sealed (hashed).
    """
    if seal is None:
        return blobs
    stored: dict[str, Stored] = {}
    for name, data in blobs.items():
        before_each()
        stored[name] = (data, seal(name, data))
    return stored


def _chunk_of(views: Sequence[memoryview], start: int, end: int) -> Buffer:
    """Bytes ``start:end`` of ``views`` end to end: a view of one, or those of two joined."""
    found: list[memoryview] = []
    at = 0
    for view in views:
        if at < end and start < at + view.nbytes:
            found.append(view[max(start - at, 0) : end - at])
        at += view.nbytes
    # A chunk spans two pieces only at a sealed blob's end: its seal (a few bytes) is
    # joined to the last bytes, so a reader never sees a chunk without it.
    return found[0] if len(found) == 1 else b"".join(found)


def _keeper_field(keeper: str) -> str:
    """A keeper's field in a blob's uses hash (apart from ``pin``, whatever the id)."""
    return f"k:{keeper}"
