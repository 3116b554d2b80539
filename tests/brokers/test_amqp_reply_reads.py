"""RabbitMQ only: what one read of a client's reply queue takes, when an outsider who can
publish to RabbitMQ (but has not the secret) fills the queue with many large messages:
its name is in every record its client sent. The Redis channels' reads are bounded the
same way (``test_channel_reads.py``)."""

from __future__ import annotations

import logging
import tracemalloc
from collections.abc import Iterator
from typing import Any

import amqp
import kombu
import pytest
from helpers import AMQP_URL

from nbtask import Settings
from nbtask.brokers.amqp import AmqpTransport
from nbtask.brokers.redis_channels import READ_COUNT, read_budget

pytestmark = pytest.mark.brokers("amqp")

MIB = 1024 * 1024


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Messages of at most 1 MiB: the largest event a client accepts."""
    return settings.replace(max_message_bytes=MIB)


@pytest.fixture
def outsider() -> Iterator[Any]:
    """A channel of the outsider's own connection to RabbitMQ."""
    with kombu.Connection(AMQP_URL, connect_timeout=5) as conn:
        yield conn.channel()


def reads_until(transport: AmqpTransport, channel: str, last: bytes) -> list[list[bytes]]:
    """The events of each read of ``channel`` until ``last`` came."""
    reads: list[list[bytes]] = []
    while not reads or last not in reads[-1]:
        reads.append([raw for _, _, raw in transport.read_events({channel: "0-0"}, 5.0)])
        assert reads[-1], "a read took nothing while messages were left"
    return reads


def test_one_read_of_a_reply_queue_takes_a_bounded_number_of_bytes_and_no_oversized_message(
    transport: AmqpTransport, settings: Settings, outsider: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A message as large as RabbitMQ takes (128 MiB by default) was read whole, then
    handed over as one event. Now a body over ``max_message_bytes`` (no event nbtask
    accepts is larger) is dropped frame by frame as it arrives, with one log line: the
    client never holds it. A read takes at most 500 messages and four such events'
    bytes (or one message); the rest follow in the next reads, none lost."""
    caplog.set_level(logging.WARNING, logger="nbtask.brokers.amqp_replies")
    channel = transport.store.channel_key("abc")
    transport.keep_channel(channel)
    assert transport.read_events({channel: "0-0"}, 0.1) == []  # its reply queue declared
    halves = [bytes([65 + i % 26]) * (MIB // 2) for i in range(12)]
    tiny = [b"t%d" % i for i in range(1200)]
    sent = [b"x" * (16 * MIB), *halves[:6], b"y" * (16 * MIB), *tiny, *halves[6:], b"genuine"]
    for body in sent:
        outsider.basic_publish(amqp.Message(body), "", channel)

    tracemalloc.start()
    try:
        reads = reads_until(transport, channel, b"genuine")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    budget = read_budget(settings.max_message_bytes)
    assert max(sum(map(len, read)) for read in reads) <= budget
    assert max(map(len, reads)) <= READ_COUNT
    assert [raw for read in reads for raw in read] == [*halves[:6], *tiny, *halves[6:], b"genuine"]
    # Never a 16 MiB body in memory: what one read hands over (4 MiB), and a few frames.
    assert peak < 16 * MIB, f"reading held {peak:,} bytes at its peak"
    dropped = [r.getMessage() for r in caplog.records if "max_message_bytes" in r.getMessage()]
    assert len(dropped) == 2 and all(f"{16 * MIB:,} bytes" in line for line in dropped), dropped
    # The connection reads on: what comes next arrives whole.
    outsider.basic_publish(amqp.Message(b"after"), "", channel)
    assert reads_until(transport, channel, b"after")[-1] == [b"after"]
