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
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from redis.exceptions import ResponseError

from nbtask.brokers.local_blobs import LocalBlobs
from nbtask.brokers.redis_link import RedisLink
from nbtask.errors import BlobError
from nbtask.settings import Settings
from nbtask.wire.blobs import ByteProgress
from nbtask.wire.envelope import Buffer

__all__ = ["CHUNK_BYTES", "RedisBlobs"]

CHUNK_BYTES = 64 * 1024 * 1024


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

    def _blob_keys(self, digest: str, size: int) -> list[str]:
        count = max(1, -(-size // self.chunk_bytes))
        return [f"{self.prefix}:blob:{digest}:{i}" for i in range(count)]

    def _uses_key(self, digest: str) -> str:
        return f"{self.prefix}:blobref:{digest}"

    def put_blobs(self, blobs: Mapping[str, Buffer], keeper: str | None = None) -> None:
        """Keep ``{digest: bytes}`` for ``result_ttl`` (sending only those not kept yet).

        ``keeper``: the id of the use these blobs serve (a kept value, a task's
        arguments), which :meth:`release_blobs` may delete them for; without one they
        are pinned.
        """
        if not blobs:
            return
        whole = self._use({digest: len(data) for digest, data in blobs.items()}, keeper)
        if self.local_blobs is not None:
            self.local_blobs.put(blobs)
            return
        writes = []
        for digest, data in blobs.items():
            if whole[digest]:
                continue
            view = memoryview(data).cast("B")
            for i, key in enumerate(self._blob_keys(digest, len(data))):
                chunk = view[i * self.chunk_bytes : (i + 1) * self.chunk_bytes]
                writes.append(("SET", key, chunk, "EX", self.ttl))
        if writes:
            with self.link.translate_errors():
                self.link.run(writes, large=True)

    def pin_blobs(self, sizes: Mapping[str, int]) -> None:
        """Keep the blobs ``{digest: size}`` (a message refers to them) a full ``result_ttl``."""
        if not sizes:
            return
        self._use(sizes, None)
        if self.local_blobs is not None:
            self.local_blobs.touch(sizes)

    def _use(self, sizes: Mapping[str, int], keeper: str | None) -> dict[str, bool]:
        """Note a use of each blob and refresh it: whether it is kept whole in Redis."""
        field = "pin" if keeper is None else _keeper_field(keeper)
        in_redis = self.local_blobs is None
        commands = []
        for digest, size in sizes.items():
            keys = self._blob_keys(digest, size) if in_redis else []
            lengths = [min(self.chunk_bytes, size - i * self.chunk_bytes) for i in range(len(keys))]
            commands.append(
                self.link.evalsha(
                    "use_blob", [self._uses_key(digest), *keys], field, self.ttl, *lengths
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
        at once).

        Raises
        ------
        BlobError
            The blob is not kept (it expired, or was deleted) or has the wrong size.
        """
        if self.local_blobs is not None:
            mapped = self.local_blobs.get(digest, size)
            if mapped is not None:
                if progress is not None:
                    progress(size)
                return mapped
        data = bytearray(size)
        at = 0
        with self.link.translate_errors():
            for key in self._blob_keys(digest, size):
                try:
                    chunk = self.link.redis.get(key)
                except ResponseError as exc:  # not a string: nbtask did not write it
                    raise BlobError(_ALTERED.format(digest=digest[:16], size=size)) from exc
                if chunk is None:
                    raise BlobError(
                        f"a large value ({size:,} bytes, blob {digest[:16]}) is no longer in "
                        f"the store: it expired (values are kept result_ttl, "
                        f"{self.ttl:,} s) or was deleted; run the task again"
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


_ALTERED = (
    "blob {digest} in the store is not {size:,} bytes long (it was altered or truncated); "
    "nothing was loaded"
)


def _keeper_field(keeper: str) -> str:
    """A keeper's field in a blob's uses hash (apart from ``pin``, whatever the id)."""
    return f"k:{keeper}"
