"""A client whose Redis stopped answering (a stalled server, a network path gone dead, a
proxy that stops passing on what it says): ``get(timeout=...)`` and ``close()`` end."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tcp_proxy import TcpProxy, on_a_thread, proxying, via

from nbtask import App, Settings

ADD = "tests.sample_tasks.add"


@pytest.fixture
def proxy(settings: Settings) -> Iterator[TcpProxy]:
    with proxying(settings.broker_url or "", 6379) as started:
        yield started


def test_get_with_a_timeout_and_close_end_when_redis_stopped_answering(
    settings: Settings, proxy: TcpProxy
) -> None:
    app = App(
        "silent",
        settings=settings.replace(broker_url=via(settings.broker_url or "", proxy.url_port)),
    )
    try:
        h = app.send_task(ADD, (1, 2))  # no worker: it stays queued
        app.flush()  # Redis took it
        proxy.deafen(new_ones=True)
        raised = on_a_thread(lambda: h.get(timeout=5))
        assert isinstance(raised, TimeoutError), raised
        assert "is still PENDING after 5 s" in str(raised)
    finally:
        assert on_a_thread(app.close) is None
