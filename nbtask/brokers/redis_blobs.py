"""Blobs in the store: large values sent out of band (:mod:`nbtask.wire.blobs`), on Redis.

A blob is kept as ``<key_prefix>:blob:<digest>:<n>`` keys, each a chunk of at most
:data:`CHUNK_BYTES` (a Redis string holds at most 512 MB, and a chunk read at a time keeps
a reader's peak memory near the blob's own size), for ``result_ttl``. When every user of
the store shares this host, blobs go through shared memory instead
(:mod:`nbtask.brokers.local_blobs`). Blobs are named by
their content, so a blob already kept is not sent again: its expiry is refreshed instead.
"""

from __future__ import annotations

from collections.abc import Mapping

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

    def put_blobs(self, blobs: Mapping[str, Buffer]) -> None:
        """Keep ``{digest: bytes}`` for ``result_ttl`` (sending only those not kept yet)."""
        if not blobs:
            return
        if self.local_blobs is not None:
            self.local_blobs.put(blobs)
            return
        keys = {digest: self._blob_keys(digest, len(data)) for digest, data in blobs.items()}
        with self.link.translate_errors():
            kept = self.link.run([("EXPIRE", key, self.ttl) for ks in keys.values() for key in ks])
            writes = []
            at = 0
            for digest, data in blobs.items():
                chunk_keys = keys[digest]
                if all(kept[at : at + len(chunk_keys)]):
                    at += len(chunk_keys)
                    continue
                at += len(chunk_keys)
                view = memoryview(data).cast("B")
                for i, key in enumerate(chunk_keys):
                    chunk = view[i * self.chunk_bytes : (i + 1) * self.chunk_bytes]
                    writes.append(("SET", key, chunk, "EX", self.ttl))
            if writes:
                self.link.run(writes, large=True)

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
                chunk = self.link.redis.get(key)
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
            raise BlobError(
                f"blob {digest[:16]} in the store is not {size:,} bytes long (it was altered "
                "or truncated); nothing was loaded"
            )
        return data
