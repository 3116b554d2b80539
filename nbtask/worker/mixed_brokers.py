"""Saying so when a worker starts on a key prefix that workers of another broker serve.

A Redis worker and a RabbitMQ worker whose store is the same Redis, on one key prefix,
share the prefix's bookkeeping (records, parked retries and countdowns, the registry) but
not their queues nor their clients' event channels: a retry one of them parks may be moved
onto the other's broker, run there, and its events sent where its client never listens.
The registry that shows this is unsigned, so it is only told, never acted on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from nbtask._text import printable
from nbtask.wire.records import WorkerInfo

__all__ = ["say_if_brokers_mixed"]

log = logging.getLogger("nbtask.worker")

#: How many of the other workers the line names, and how much of each unsigned text.
_NAMED = 3
_TEXT = 60


def say_if_brokers_mixed(
    kind: str, prefix: str, live: Mapping[str, WorkerInfo], worker_id: str
) -> str | None:
    """Log, as one error line, which live workers of ``prefix`` serve another kind of broker.

    ``kind``: the broker this worker serves (:func:`nbtask.brokers.broker_kind`); ``live``:
    the registry's live workers. An entry from an older nbtask, which does not say its
    broker, is not counted. Returns the line, or ``None`` if there are none.
    """
    others = {
        other: info.broker
        for other, info in live.items()
        if other != worker_id and info.broker and info.broker != kind
    }
    if not others:
        return None
    named = ", ".join(
        f"{printable(other[:_TEXT])} ({printable(broker[:_TEXT])})"
        for other, broker in sorted(others.items())[:_NAMED]
    )
    more = f" and {len(others) - _NAMED} more" if len(others) > _NAMED else ""
    line = (
        f"key prefix {prefix!r} is served by live workers of another broker ({named}{more}) "
        f"while this one serves {kind}: a retry or countdown one of them parks may be run "
        "by the other, and its client never hears of it; give each broker's workers and "
        "clients their own key prefix (--key-prefix, NBTASK_KEY_PREFIX)"
    )
    log.error("%s", line)
    return line
