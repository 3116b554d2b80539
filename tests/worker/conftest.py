"""Fixtures of the worker tests that reach the store through a proxy."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tcp_proxy import TcpProxy, proxying, via

from nbtask import Settings
from nbtask.brokers import Transport, open_broker


@pytest.fixture
def store_proxy(redis_url: str) -> Iterator[TcpProxy]:
    """A proxy in front of the store (the real Redis, on both brokers)."""
    with proxying(redis_url, 6379) as opened:
        yield opened


@pytest.fixture
def proxied(settings: Settings, store_proxy: TcpProxy) -> Iterator[Transport]:
    """A worker's transport whose store connections go through ``store_proxy``."""
    if settings.result_url:  # RabbitMQ: the store is the Redis beside it
        settings = settings.replace(result_url=via(settings.result_url, store_proxy.url_port))
        transport = open_broker(settings, settings.broker_url or "")
    else:
        transport = open_broker(settings, via(settings.broker_url or "", store_proxy.url_port))
    yield transport
    transport.close()
