"""Frames read off a real TCP socket by the AMQP transport (``nbtask.brokers.amqp_reads``).

A local listening socket stands in for RabbitMQ's end: it writes AMQP frames as given,
whole, several at once, or cut in the middle. Bodies too large are screened out of the
frames as they come (the same with a real RabbitMQ: ``test_amqp_reply_reads.py``).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from nbtask.brokers.amqp_reads import OVERSIZED_HEADER, BodyLimits, BufferedTCPTransport


def frame(kind: int, channel: int, payload: bytes) -> bytes:
    """One AMQP frame: type, channel, size, payload, end octet."""
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + b"\xce"


@pytest.fixture
def pair() -> Iterator[tuple[Any, socket.socket]]:
    """A connected transport and the server end of its socket."""
    server = socket.create_server(("127.0.0.1", 0))
    transport = BufferedTCPTransport(f"127.0.0.1:{server.getsockname()[1]}", connect_timeout=5)
    transport.connect()
    peer, _ = server.accept()
    peer.recv(8)  # the protocol header the transport sends first
    try:
        yield transport, peer
    finally:
        transport.close()
        peer.close()
        server.close()


def counting_recvs(transport: Any) -> list[int]:
    """Note every ``recv`` the transport makes (sizes asked for) on its real socket."""
    asked: list[int] = []
    recv = transport._quick_recv

    def noted(size: int) -> bytes:
        asked.append(size)
        data: bytes = recv(size)
        return data

    transport._quick_recv = noted
    return asked


def test_frames_that_arrived_together_are_read_with_one_recv(
    pair: tuple[Any, socket.socket],
) -> None:
    transport, peer = pair
    frames = [frame(1, 1, b"method"), frame(2, 1, b"header" * 3), frame(3, 1, b"body" * 50)]
    peer.sendall(b"".join(frames))
    asked = counting_recvs(transport)
    with transport.having_timeout(5):
        got = [transport.read_frame() for _ in frames]
    assert got == [(1, 1, b"method"), (2, 1, b"header" * 3), (3, 1, b"body" * 50)]
    assert len(asked) == 1  # py-amqp's own transport asks three times a frame


def test_a_frame_cut_by_a_timeout_is_completed_by_the_next_read(
    pair: tuple[Any, socket.socket],
) -> None:
    transport, peer = pair
    whole = frame(1, 7, b"x" * 100) + frame(3, 7, b"y" * 40_000)
    peer.sendall(whole[:60])  # the first frame cut in its payload
    with transport.having_timeout(0.05), pytest.raises(socket.timeout):
        transport.read_frame()
    peer.sendall(whole[60:])
    with transport.having_timeout(5):
        assert transport.read_frame() == (1, 7, b"x" * 100)
        assert transport.read_frame() == (3, 7, b"y" * 40_000)  # larger than one read


def test_a_closed_connection_is_an_error_once_its_frames_are_read(
    pair: tuple[Any, socket.socket],
) -> None:
    transport, peer = pair
    peer.sendall(frame(8, 0, b""))
    peer.close()
    with transport.having_timeout(5):
        assert transport.read_frame() == (8, 0, b"")
        with pytest.raises(OSError, match="unexpectedly closed"):
            transport.read_frame()


def test_frames_read_whole_already_are_handed_over_without_the_socket(
    pair: tuple[Any, socket.socket],
) -> None:
    transport, peer = pair
    whole = frame(1, 2, b"a" * 10) + frame(3, 2, b"b" * 20) + frame(1, 2, b"c" * 30)
    peer.sendall(whole[:-5])  # the last frame cut short
    with transport.having_timeout(5):
        assert transport.read_frame() == (1, 2, b"a" * 10)
    asked = counting_recvs(transport)
    assert transport.buffered_frame() == (3, 2, b"b" * 20)
    assert transport.buffered_frame() is None  # not all of it is here
    assert asked == []
    peer.sendall(whole[-5:])
    with transport.having_timeout(5):
        assert transport.read_frame() == (1, 2, b"c" * 30)
    assert transport.buffered_frame() is None


def deliver(tag: bytes) -> bytes:
    """A ``basic.deliver`` method frame's payload to consumer ``tag``."""
    return struct.pack(">HHB", 60, 60, len(tag)) + tag + struct.pack(">QB", 1, 0) + b"\x00\x00"


def content_header(body_size: int) -> bytes:
    """A content header frame's payload: class, weight, body size, no properties."""
    return struct.pack(">HHQH", 60, 0, body_size, 0)


def test_bodies_over_the_limit_of_a_screened_consumer_are_dropped_as_they_arrive() -> None:
    limits = BodyLimits()
    limits.limit("reply-", 100)
    screened = [
        (1, 1, deliver(b"reply-1")),
        (2, 1, content_header(250)),
        (3, 1, b"x" * 100),
        (1, 2, deliver(b"task-1")),  # another channel's delivery, between the body frames
        (2, 2, content_header(250)),
        (3, 2, b"y" * 250),
        (3, 1, b"x" * 150),
        (1, 1, deliver(b"reply-1")),
        (2, 1, content_header(100)),  # at the limit: read
        (3, 1, b"z" * 100),
    ]
    out = [limits.screen(f) for f in screened]
    kind, channel, header = out[1] or (0, 0, b"")
    assert (kind, channel) == (2, 1)
    (size,) = struct.unpack_from(">Q", header, 4)
    assert size == 0  # bodyless now, its properties one header: the size dropped
    assert OVERSIZED_HEADER.encode() in header
    assert out[2] is None and out[6] is None  # its body, dropped frame by frame
    assert out[3:6] == screened[3:6]  # another consumer's large body is read whole
    assert out[7:] == screened[7:]
    assert out[0] == screened[0]
