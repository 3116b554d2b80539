"""What each worker process holds, on Redis, for ``nbtask status``.

Key, under ``<key_prefix>:``: ``holdings`` (a hash of consumer name ->
:class:`~nbtask.wire.holdings.Holdings` JSON). A process rewrites its field whenever what
it holds changes; its worker removes the fields of its processes when it stops, and the
worker that cleans up after a dead one removes that one's. Readers show only the fields of
live workers' processes.

``named:<namer>``: a live notebook session's mark that it names a kept value (or that it
lives, for the values its cells kept), renewed at a low rate with an expiry: a holder drops
the values none of whose marks is left (:mod:`nbtask.core.holding`). A mark is one small
string; any key there counts as a mark, so a key of another type planted there keeps a
value held, never drops it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from redis.exceptions import ResponseError

from nbtask.brokers.redis_link import RedisLink
from nbtask.wire.holdings import Holdings

__all__ = ["RedisHoldings"]


class RedisHoldings:
    """The holdings part of :class:`~nbtask.brokers.redis_store.RedisStore`."""

    link: RedisLink
    prefix: str

    @property
    def _holdings_key(self) -> str:
        return f"{self.prefix}:holdings"

    def announce_holdings(self, consumer: str, holdings: Holdings) -> None:
        """Say what the process serving as ``consumer`` holds now."""
        with self.link.translate_errors():
            self.link.hset_replacing(self._holdings_key, consumer, holdings.to_json())

    def holdings(self, consumers: Sequence[str]) -> dict[str, Holdings]:
        """What each of ``consumers`` announced (unreadable or absent ones left out)."""
        if not consumers:
            return {}
        with self.link.translate_errors():
            try:
                found = self.link.redis.hmget(self._holdings_key, list(consumers))
            except ResponseError:  # not a hash: nbtask did not write it
                return {}
        parsed = {c: Holdings.parse(raw) for c, raw in zip(consumers, found, strict=True)}
        return {c: h for c, h in parsed.items() if h is not None}

    def mark_named(self, namers: Sequence[str], seconds: float) -> None:
        """Mark each of ``namers`` for ``seconds``: one pipelined ``SET`` (any type replaced)."""
        if not namers:
            return
        ttl = max(1, math.ceil(seconds))
        with self.link.translate_errors():
            pipe = self.link.redis.pipeline(transaction=False)
            for namer in namers:
                pipe.set(self._named_key(namer), 1, ex=ttl)
            pipe.execute()

    def named(self, namers: Sequence[str]) -> set[str]:
        """Those of ``namers`` still marked (one pipelined read)."""
        order = list(namers)
        if not order:
            return set()
        with self.link.translate_errors():
            pipe = self.link.redis.pipeline(transaction=False)
            for namer in order:
                pipe.exists(self._named_key(namer))
            found = pipe.execute()
        return {namer for namer, there in zip(order, found, strict=True) if there}

    def _named_key(self, namer: str) -> str:
        return f"{self.prefix}:named:{namer}"

    def forget_holdings(self, consumers: Sequence[str]) -> None:
        """Drop the announcements of processes that ended."""
        if consumers:
            with self.link.translate_errors():
                self.link.redis.hdel(self._holdings_key, *consumers)
