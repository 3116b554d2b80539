"""Redis, behind a proxy that stops passing on what it says, answers nothing: a bounded
block (a stopping worker's) gives up on it once, then fails at once, not once per command."""

from __future__ import annotations

import pytest
from tcp_proxy import TcpProxy, via

from nbtask import Settings
from nbtask.brokers import open_broker
from nbtask.errors import BrokerUnavailable


def test_a_bounded_block_gives_up_on_a_silent_redis_once_then_at_once(
    settings: Settings, proxy: TcpProxy
) -> None:
    """The connection that waited is dropped, not reused half-read; so is its retry on a
    new connection (one more wait), and the block's later commands do not wait at all."""
    transport = open_broker(settings, via(settings.broker_url or "", proxy.url_port))
    try:
        transport.ping()  # connected, its scripts loaded
        proxy.deafen(new_ones=True)
        with transport.answers_within(1.0):
            with pytest.raises(BrokerUnavailable, match=r"did not answer within 1 s: Timeout"):
                transport.ping()
            # Known silent: the next command does not wait again.
            with pytest.raises(BrokerUnavailable, match="unanswered just now"):
                transport.ping()
        proxy.hear()
        proxy.cut()
        transport.ping()  # a Redis that answers again is used again
    finally:
        transport.close()
