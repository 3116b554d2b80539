"""RabbitMQ only: a client's events reach it two ways, its reply queue and the catch-up
from its stream in the store when it (re)declares the queue; each is read once.

A worker keeps an event on the stream, then publishes it: the two overlap for an event
kept before the catch-up and published after the queue's consumer began, and (the live
reads not moving the stream position) for every event received live before a reconnect.
"""

from __future__ import annotations

import pytest

from nbtask.brokers.amqp import AmqpTransport

pytestmark = pytest.mark.brokers("amqp")


@pytest.fixture
def channel(transport: AmqpTransport) -> str:
    """A client channel of the transport's own (read from its reply queue)."""
    name = transport.store.channel_key("abc")
    transport.keep_channel(name)
    return name


def read_until(transport: AmqpTransport, channel: str, last: bytes) -> list[bytes]:
    """The events of ``channel`` read until ``last`` came, and what came with it."""
    got: list[bytes] = []
    while last not in got:
        read = [raw for _, _, raw in transport.read_events({channel: "0-0"}, 5.0)]
        assert read, f"a read took nothing before {last!r} came; read so far: {got}"
        got += [raw for raw in read if raw]  # (an empty one wakes a reader up)
    return got


def test_an_event_kept_before_the_catch_up_and_published_after_its_queue_began_is_read_once(
    transport: AmqpTransport, channel: str
) -> None:
    """The client declared its queue between a worker's keeping the event on the stream
    and its publishing it: the catch-up read it, and the queue brought it again. A copy
    published once more (a replay, a worker sending an outcome again) still comes: the
    handle it is for says what it makes of it."""
    transport.store.append_events(channel, [b"kept"])  # a worker keeps it, ...
    assert read_until(transport, channel, b"kept") == [b"kept"]  # the catch-up reads it
    transport.notify(channel, [b"kept", b"next"])  # ... then publishes it, and the next
    assert read_until(transport, channel, b"next") == [b"next"]
    transport.notify(channel, [b"kept", b"last"])
    assert read_until(transport, channel, b"last") == [b"kept", b"last"]


def test_events_received_live_are_not_read_again_by_the_catch_up_after_a_reconnect(
    transport: AmqpTransport, channel: str
) -> None:
    """The catch-up after a lost connection reads what was kept while the queue was gone,
    not again every event received live since the last catch-up."""
    assert transport.read_events({channel: "0-0"}, 0.1) == []  # its queue declared
    transport.emit(channel, [b"one", b"two"])  # kept, then published: received live
    assert read_until(transport, channel, b"two") == [b"one", b"two"]
    transport.links.drop()  # the connection is lost: its queue goes with it
    transport.store.append_events(channel, [b"meanwhile"])  # a worker's, published to no queue
    assert read_until(transport, channel, b"meanwhile") == [b"meanwhile"]
    transport.emit(channel, [b"after"])
    assert read_until(transport, channel, b"after") == [b"after"]
