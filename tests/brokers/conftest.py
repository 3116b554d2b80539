"""Fixtures of the broker tests: the test's broker behind a proxy, and a client using it.

The :class:`~tcp_proxy.TcpProxy` stands in front of the broker the test runs on (Redis,
or RabbitMQ), so that a test can lose what the client sends or what the broker answers
(``hold()``, ``deafen()``, ``cut()``, ``refuse()``). On RabbitMQ the client reaches its
store (the real Redis) directly; workers reach both directly.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tcp_proxy import TcpProxy, proxying, via

from nbtask import App, Settings


@pytest.fixture
def proxy(settings: Settings) -> Iterator[TcpProxy]:
    """A proxy in front of the test's broker, for the test's client."""
    url = settings.broker_url or ""
    with proxying(url, 5672 if url.startswith("amqp") else 6379) as opened:
        yield opened


@pytest.fixture
def client(settings: Settings, proxy: TcpProxy) -> Iterator[App]:
    """A client app whose broker connections go through ``proxy``."""
    url = via(settings.broker_url or "", proxy.url_port)
    application = App("proxied", settings=settings.replace(broker_url=url))
    yield application
    application.close()
