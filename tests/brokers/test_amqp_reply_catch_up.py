"""RabbitMQ only: a client's events reach it two ways, its reply queue and the catch-up
from its stream in the store when it (re)declares the queue; each is read once.

A worker keeps an event on the stream, then publishes it with the id it was kept under:
the two overlap for an event kept before the catch-up and published after the queue's
consumer began, and for the events received live just before a reconnect (a catch-up
starts shortly before the newest one received with its position, once it verified).
"""

from __future__ import annotations

import collections
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import amqp
import kombu
import pytest
from amqp.exceptions import NotFound, ResourceLocked
from helpers import AMQP_URL, SECRET, wait_until
from tcp_proxy import TcpProxy

from nbtask import Settings
from nbtask.brokers.amqp import AmqpTransport
from nbtask.brokers.amqp_guards import ENTRY_HEADER
from nbtask.brokers.amqp_overlap import MARGIN_MS
from nbtask.brokers.redis_channels import CHANNEL_MAXLEN
from nbtask.client.listener import Listener
from nbtask.core.handle import TaskHandle
from nbtask.wire.envelope import Signer
from nbtask.wire.events import Event, EventType

pytestmark = pytest.mark.brokers("amqp")

#: The client's one log line on finding events trimmed unread (nbtask/client/event_reads.py).
TRIMMED = "events of this client were trimmed before it read them"


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


def test_each_event_is_published_with_the_id_it_was_kept_under(
    worker_transport: AmqpTransport,
) -> None:
    """A worker's events (sent as its task runs, and the task's end) and a revoke are kept
    on the client's stream, then published with the id each was kept under beside it:
    where the client's next catch-up may start."""
    store = worker_transport.store
    channel = store.channel_key(uuid.uuid4().hex[:16])
    published: dict[bytes, str] = {}
    with kombu.Connection(AMQP_URL, connect_timeout=5) as conn:
        reader = conn.channel()
        reader.queue_declare(queue=channel, auto_delete=True)  # stands for the client's
        worker_transport.emit(channel, [b"one", b"two"])
        ended = {"state": "SUCCESS", "result": "=event"}
        worker_transport.finish(None, f"ended-{uuid.uuid4().hex}", channel, b"end", ended)
        revoked = store.revoke_pending(f"revoked-{uuid.uuid4().hex}", b"revoked", channel)
        worker_transport.notify(channel, [b"revoked"], entries=[revoked])  # as a client does

        def all_came() -> bool:
            message = reader.basic_get(queue=channel, no_ack=True)
            if message is not None:
                published[bytes(message.body)] = message.headers.get(ENTRY_HEADER)
            return len(published) == 4

        wait_until(all_came, 10, "the four events on the queue")
    kept = {raw: entry for entry, raw in store.events_after(channel, "0-0")}
    assert published == kept and len(kept) == 4


class Followed:
    """A client listening on its own channel (through ``proxy``) to one task's progress.

    Every event its reads brought is noted (``read``), as are the handles it was asked to
    take from their records (``recovered``).
    """

    def __init__(self, transport: AmqpTransport, prefix: str, monkeypatch: Any) -> None:
        self.signer = Signer(SECRET)
        self.channel = transport.store.channel_key(uuid.uuid4().hex[:16])
        self.task_id = f"followed-{uuid.uuid4().hex[:8]}"
        self.run = (prefix, None)
        self.read: list[bytes] = []
        self.recovered: list[TaskHandle] = []
        reads = transport.read_events

        def noted(channels: dict[str, str], block_seconds: float) -> list[tuple[str, str, bytes]]:
            got = reads(channels, block_seconds)
            self.read += [raw for _, _, raw in got if raw]
            return got

        monkeypatch.setattr(transport, "read_events", noted)
        self.transport = transport
        self.handle = TaskHandle(None, self.task_id, "followed")
        self.listener: Listener | None = None
        self._sealed: dict[int, bytes] = {}

    def events(self, first: int, last: int) -> list[bytes]:
        """Signed progress events ``first`` to ``last`` of the task, as a worker seals them.

        Each is sealed once: the same number is the same bytes every time it is asked for.
        """
        for n in range(first, last + 1):
            if n not in self._sealed:
                event = Event(EventType.PROGRESS, self.task_id, n, {"done": n}, run=self.run)
                self._sealed[n] = self.signer.seal(event.to_header())
        return [self._sealed[n] for n in range(first, last + 1)]

    def listen(self) -> None:
        """Start listening; return once the first catch-up read event 1, kept before."""
        self.listener = Listener(
            self.transport, self.signer, self.channel, self.run[0], recover=self.recovered.extend
        )
        self.listener.register(self.handle)
        self.wait_for(1, "the event kept before the reply queue was declared")

    def wait_for(self, done: int, what: str) -> None:
        def came() -> bool:
            progress = self.handle.progress
            return progress is not None and progress.done >= done

        wait_until(came, 30, what)

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()


@pytest.fixture
def followed(
    proxied_transport: AmqpTransport, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Followed]:
    opened = Followed(proxied_transport, settings.key_prefix, monkeypatch)
    yield opened
    opened.close()


def queue_exists(name: str) -> bool:
    """Whether RabbitMQ still has the (exclusive) queue ``name``."""
    with kombu.Connection(AMQP_URL, connect_timeout=5) as conn:
        try:
            conn.channel().queue_declare(queue=name, passive=True)
        except ResourceLocked:  # exclusive to another connection: there
            return True
        except NotFound:
            return False
    return True


def dropped_while(proxy: TcpProxy, followed: Followed, send: Callable[[], None]) -> None:
    """Drop the client's connection (its reply queue goes), ``send``, let it reconnect."""
    proxy.refuse()
    wait_until(lambda: not queue_exists(followed.channel), 10, "the reply queue to go")
    send()  # kept on the stream, published to no queue
    proxy.accept_again()


def test_a_reconnect_after_more_events_came_live_than_a_channel_keeps_reads_what_it_missed(
    followed: Followed,
    worker_transport: AmqpTransport,
    proxy: TcpProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Live reads did not move the client's position in its stream, only a catch-up did:
    after more events came live than the stream keeps (10,000), the catch-up after a
    reconnect started before the oldest one kept, said events were trimmed unread (and
    the handles were taken from their records) though none was, and read 10,000 entries
    at most: the newest, sent while the connection was down, waited for a later
    reconnect. Now each event comes with the id it was kept under, and the catch-up
    starts shortly before the newest one received: only what it missed is read, once."""
    caplog.set_level(logging.WARNING)
    live = CHANNEL_MAXLEN + 100
    # One kept before the client's queue existed: its first catch-up reads it, the rest
    # come live.
    worker_transport.store.append_events(followed.channel, followed.events(1, 1))
    followed.listen()
    for first in range(2, live + 1, 500):
        worker_transport.emit(followed.channel, followed.events(first, min(first + 499, live)))
    followed.wait_for(live, "the events sent live")
    # The catch-up starts MARGIN_MS (stream time) before the newest event received live:
    # this one came later than that after the 10,100 (a burst that close would be said
    # trimmed, as it may be: another worker's event kept before it may still be on its way).
    time.sleep(MARGIN_MS / 1000 + 0.2)
    worker_transport.emit(followed.channel, followed.events(live + 1, live + 1))
    followed.wait_for(live + 1, "the last event sent live")
    missed = followed.events(live + 2, live + 11)
    dropped_while(proxy, followed, lambda: worker_transport.emit(followed.channel, missed))
    followed.wait_for(live + 11, "the events sent while the connection was down")

    counts = collections.Counter(followed.read)
    assert set(counts) == set(followed.events(1, live + 11))
    assert [raw for raw, n in counts.items() if n > 1] == []  # each read once
    assert not [r for r in caplog.records if TRIMMED in r.getMessage()]
    assert followed.recovered == []
    followed.close()
    assert not followed.transport.events_lost(followed.channel, "0-0")


def test_a_position_planted_on_the_reply_queue_hides_no_event(
    followed: Followed,
    worker_transport: AmqpTransport,
    proxy: TcpProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Anyone who can publish to RabbitMQ can put a message on a client's reply queue
    (its name is in every record it sent), with any position beside it: junk, and a
    genuine event published again, both beside a position far past the stream's end.
    Neither moves where the catch-up after a reconnect starts: the junk does not verify,
    and the stream does not hold the genuine event there. The events sent while the
    connection was down all arrive, once."""
    caplog.set_level(logging.WARNING)
    worker_transport.store.append_events(followed.channel, followed.events(1, 1))
    followed.listen()
    worker_transport.emit(followed.channel, followed.events(2, 5))
    followed.wait_for(5, "the events sent live")
    huge = {ENTRY_HEADER: f"{2**63}-0"}
    replayed = followed.events(5, 5)[0]
    with kombu.Connection(AMQP_URL, connect_timeout=5) as conn:
        outsider = conn.channel()
        for body in (b"junk", replayed):
            message = amqp.Message(body, application_headers=huge)
            outsider.basic_publish(message, "", followed.channel)
    wait_until(
        lambda: b"junk" in followed.read and followed.read.count(replayed) == 2,
        10,
        "the planted messages to be read",
    )
    missed = followed.events(6, 10)
    dropped_while(proxy, followed, lambda: worker_transport.emit(followed.channel, missed))
    followed.wait_for(10, "the events sent while the connection was down")

    assert [followed.read.count(raw) for raw in missed] == [1] * len(missed)
    assert not [r for r in caplog.records if TRIMMED in r.getMessage()]
    assert followed.recovered == []
