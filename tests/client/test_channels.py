"""A client's event channel in the store goes once the client is gone.

Real brokers; the channel is a stream in Redis on both.
"""

from __future__ import annotations

import time

import pytest
from raw_broker import RawBroker

from nbtask import App, Settings
from nbtask.errors import TaskNotFound

pytestmark = pytest.mark.brokers


def test_a_client_that_closes_before_any_event_leaves_no_channel_for_good(
    settings: Settings, access: RawBroker
) -> None:
    app = App("short-lived", settings=settings)
    with pytest.raises(TaskNotFound):
        app.handle("0" * 32)  # its listener starts; no event ever comes
    channel = app.channel
    time.sleep(0.5)  # its listener has kept the (empty) channel and waits on it
    app.close()  # wakes its listener with an empty entry in its channel
    ttl = access.store.ttl(channel)
    assert ttl == -2 or 0 < ttl <= settings.result_ttl, f"{channel} never expires ({ttl})"
