"""The AMQP frames nbtask builds itself (``nbtask.brokers.amqp_frames``).

They must be the bytes py-amqp writes for the same publish or acknowledgement (its own
frame writer, given the same arguments, is the reference), and RabbitMQ must take them:
messages published through a link come back from the real server as they were sent.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import kombu
import pytest
from amqp.basic_message import Message
from amqp.method_framing import frame_writer
from amqp.serialization import dumps
from helpers import AMQP_URL
from kombu.exceptions import MessageStateError

from nbtask.brokers.amqp_frames import ack_frame, publish_frames, read_confirm
from nbtask.brokers.amqp_links import Links

pytestmark = pytest.mark.brokers("amqp")

FRAME_MAX = 131_072  # RabbitMQ's default


class _Sink:
    """What py-amqp's frame writer needs of a connection and a transport: bytes go here."""

    def __init__(self, frame_max: int) -> None:
        self.frame_max = frame_max
        self.bytes_sent = 0
        self.written: list[bytes] = []

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))


def py_amqp_publish(
    channel: int,
    frame_max: int,
    routing_key: str,
    raw: bytes,
    *,
    persistent: bool,
    headers: dict[str, Any],
    mandatory: bool,
) -> bytes:
    """The frames py-amqp writes for the publish nbtask makes (kombu's message, as before)."""
    sink = _Sink(frame_max)
    message = Message(
        raw,
        content_type="application/octet-stream",
        content_encoding="binary",
        application_headers=dict(headers),
        delivery_mode=2 if persistent else 1,
        priority=None,
    )
    args = dumps("Bssbb", (0, "", routing_key, mandatory, False))
    frame_writer(sink, sink)(1, channel, (60, 40), args, message)
    return b"".join(sink.written)


@pytest.mark.parametrize(
    ("routing_key", "raw", "persistent", "headers", "mandatory"),
    [
        ("client-reply-1", b"an event", False, {}, False),
        ("nb:q:default", b"a task", True, {"nbtask-id": "abc", "nbtask-deliveries": 0}, True),
        ("nb:q:é", b"", True, {"nbtask-id": "ü" * 40, "nbtask-deliveries": 7}, True),
        ("q", b"x" * 1000, True, {"big": 2**40, "neg": -(2**31), "flag": True}, True),
        ("q", b"y", False, {"f": 1.5, "none": None, "list": [1, "a"]}, False),
        ("q", bytes(range(256)) * 2000, True, {"nbtask-id": "t"}, True),  # several frames
    ],
)
def test_a_publish_is_the_bytes_py_amqp_writes(
    routing_key: str, raw: bytes, persistent: bool, headers: dict[str, Any], mandatory: bool
) -> None:
    options: dict[str, Any] = {"persistent": persistent, "headers": headers, "mandatory": mandatory}
    for channel in (1, 513):
        args = (channel, FRAME_MAX, routing_key, raw)
        assert publish_frames(*args, **options) == py_amqp_publish(*args, **options)


def test_a_body_larger_than_a_frame_is_split_as_py_amqp_splits_it() -> None:
    raw = b"z" * 10_000
    headers = {"nbtask-id": "a"}
    kwargs: dict[str, Any] = {"persistent": True, "headers": headers, "mandatory": True}
    assert publish_frames(3, 4096, "q", raw, **kwargs) == py_amqp_publish(
        3, 4096, "q", raw, **kwargs
    )


def test_an_ack_is_the_frame_py_amqp_writes() -> None:
    for channel, tag in ((1, 1), (2, 2**40 + 5)):
        sink = _Sink(FRAME_MAX)
        frame_writer(sink, sink)(1, channel, (60, 80), dumps("Lb", (tag, False)), None)
        assert ack_frame(channel, tag) == b"".join(sink.written)
        payload = ack_frame(channel, tag)[7:-1]
        assert read_confirm(payload) == (tag, False)


def test_only_a_basic_ack_reads_as_a_confirm() -> None:
    assert read_confirm(b"\x00\x3c\x00\x50" + (9).to_bytes(8, "big") + b"\x01") == (9, True)
    assert read_confirm(b"\x00\x3c\x00\x78" + (9).to_bytes(8, "big") + b"\x01") is None  # nack
    assert read_confirm(b"\x00\x3c\x00\x50" + (9).to_bytes(8, "big")) is None  # cut short


@pytest.fixture
def queue() -> Iterator[str]:
    """A durable queue of its own on the real RabbitMQ, deleted afterwards."""
    name = f"nbtest-frames-{uuid.uuid4().hex[:10]}"
    yield name
    with kombu.Connection(AMQP_URL, connect_timeout=5) as conn:
        conn.channel().queue_delete(name)


def test_rabbitmq_takes_the_frames_and_hands_back_what_was_sent(queue: str) -> None:
    links = Links(AMQP_URL)
    bodies = [b"", b"small", bytes(range(256)) * 2000]  # the last is several frames
    try:

        def send(link: Any) -> None:
            links.queues.declare(link, queue)
            for i, raw in enumerate(bodies):
                headers = {"nbtask-id": f"task-{i}-é", "nbtask-deliveries": i}
                links.send(link, queue, raw, persistent=True, headers=headers, task_id=f"t{i}")

        links.publishing(send)  # returns once RabbitMQ confirmed them all
        with links.using() as link:
            got = list(links.queues.waiting(link, queue, ack=False))
            assert [m.body or b"" for m in got] == bodies
            for i, message in enumerate(got):
                assert message.headers == {"nbtask-id": f"task-{i}-é", "nbtask-deliveries": i}
                assert message.properties["delivery_mode"] == 2
                assert message.content_type == "application/octet-stream"
                link.ack(message)
            with pytest.raises(MessageStateError):
                link.ack(got[0])  # kombu's refusal of a second ack, as before
        links.drop()  # unacknowledged messages would come back on a new connection
        with links.using() as link:
            assert list(links.queues.waiting(link, queue, ack=True)) == []
    finally:
        links.close()


def counting_sends(link: Any) -> list[int]:
    """Note the size of every write that reaches the link's socket."""
    sizes: list[int] = []
    write = link.buffered._write

    def noted(data: Any) -> None:
        sizes.append(len(data))
        write(data)

    link.buffered._write = noted
    return sizes


@pytest.fixture
def links(queue: str) -> Iterator[Links]:
    """nbtask's links to the real RabbitMQ, ``queue`` declared; closed afterwards."""
    opened = Links(AMQP_URL)
    try:
        opened.publishing(lambda link: opened.queues.declare(link, queue))
        yield opened
    finally:
        opened.close()


def test_an_event_and_an_ack_written_together_leave_in_one_send(links: Links, queue: str) -> None:
    links.publishing(lambda link: links.send(link, queue, b"t", persistent=True, task_id="t"))
    with links.using() as link:
        (message,) = links.queues.waiting(link, queue, ack=False)
        sends = counting_sends(link)
        with links.writes_together():
            event = lambda link: links.send(link, queue, b"e", persistent=False)  # noqa: E731
            links.publishing(event, wait=False)  # as a worker sends a task's last event
            link.ack(message)
            assert sends == []  # held until the end
        assert len(sends) == 1
        links.flush()  # the event confirmed: it was sent whole
        assert [m.body for m in links.queues.waiting(link, queue, ack=True)] == [b"e"]


def test_a_read_while_writes_are_held_sends_them_first(links: Links, queue: str) -> None:
    with links.writes_together():
        # Waiting for its confirm reads the connection: the publish must be out by then.
        links.publishing(lambda link: links.send(link, queue, b"m", persistent=True))
    with links.using() as link:
        assert [m.body for m in links.queues.waiting(link, queue, ack=True)] == [b"m"]


def test_held_writes_whose_connection_failed_are_sent_again_on_a_new_one(
    links: Links, queue: str
) -> None:
    first = links.current()
    assert first is not None
    message = lambda link: links.send(link, queue, b"m", persistent=True)  # noqa: E731
    with links.writes_together():
        links.publishing(message, wait=False)
        first.buffered.sock.close()  # the final write fails
    assert links.current() is not first
    with links.using() as link:
        assert [m.body for m in links.queues.waiting(link, queue, ack=True)] == [b"m"]
