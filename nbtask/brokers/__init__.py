"""Brokers: where task messages wait, where events travel, and where results are kept.

A broker is a :class:`~nbtask.brokers.base.Transport` (Redis Streams, or AMQP through
kombu) with its :class:`~nbtask.brokers.base.Store` (always Redis). To add a broker, write
a transport module beside ``redis_streams`` and ``amqp`` and choose it in
:func:`open_broker`; nothing above this package changes.
"""

from __future__ import annotations

from nbtask._text import redact_url
from nbtask.brokers.base import Store, Transport
from nbtask.brokers.handoffs import Delivery, Publish, StartBy, Verdict
from nbtask.brokers.redis_link import RedisLink
from nbtask.brokers.redis_store import RedisStore
from nbtask.brokers.redis_streams import StreamsTransport
from nbtask.errors import ConfigurationError
from nbtask.settings import KOMBU_SCHEMES, Settings

__all__ = [
    "Delivery",
    "Publish",
    "StartBy",
    "Store",
    "Transport",
    "Verdict",
    "broker_kind",
    "open_broker",
]


def broker_kind(url: str) -> str:
    """The kind of broker ``url`` names: ``"redis"`` (Redis Streams), ``"amqp"``, ``"memory"``.

    Workers of different kinds on one key prefix (their store on the same Redis) share
    its bookkeeping but not their queues nor their clients' event channels.
    """
    scheme = url.split("://", 1)[0].lower()
    if scheme not in KOMBU_SCHEMES:
        return "redis"
    return "amqp" if scheme.startswith("amqp") else scheme


def open_broker(settings: Settings, url: str) -> Transport:
    """The transport for ``url``, with its store.

    Redis Streams for ``redis``/``rediss``/``unix`` (the server is its own store); AMQP
    for ``amqp``/``amqps``/``memory``, with the Redis store at ``settings.result_url``.
    """
    if broker_kind(url) == "redis":
        return StreamsTransport(RedisStore(RedisLink(url, "broker"), settings))
    if not settings.result_url:
        raise ConfigurationError(
            f"the broker {redact_url(url)} needs a result store: set NBTASK_RESULT_URL (or "
            "App(result_url=...)) to a Redis URL, e.g. redis://127.0.0.1:6379/0. "
            "Task records, exactly-once starts, revoke, ETA/countdown and re-attach "
            "(app.handle(id)) live there"
        )
    # kombu is imported only for an AMQP broker: ``import nbtask`` never loads it.
    from nbtask.brokers.amqp import AmqpTransport  # noqa: PLC0415 - kombu is heavy

    return AmqpTransport(url, RedisStore(RedisLink(settings.result_url, "result store"), settings))
