"""What the tests of pipelined sends (Redis's replies, RabbitMQ's confirms) share: the Redis
link and transport a client sends through."""

from __future__ import annotations

from nbtask import App
from nbtask.brokers.redis_link import RedisLink
from nbtask.brokers.redis_store import RedisStore
from nbtask.brokers.redis_streams import StreamsTransport


def transport_of(app: App) -> StreamsTransport:
    transport = app.transport
    assert isinstance(transport, StreamsTransport)
    return transport


def link_of(app: App) -> RedisLink:
    """The link of the Redis the client writes its tasks' records to (on both brokers)."""
    store = app.transport.store
    assert isinstance(store, RedisStore)
    return store.link
