"""A flush and the AMQP links of other threads: a live thread's are its own to settle.

A thread that sends without waiting leaves confirms to come on its link; its own flush
(or next send) reads them. Another thread's flush has nothing to do for that link while
its thread is alive, and returns at once; once that thread ended, a flush takes the link
over and reads them (see :func:`~nbtask.brokers.amqp_others.left_behind`, asked by both).

The client reaches RabbitMQ through a :class:`~tcp_proxy.TcpProxy`: ``hold()`` keeps its
messages, and so their confirms, back until ``release()``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import kombu
import pytest
from helpers import AMQP_URL, RECORD_ID
from tcp_proxy import TcpProxy

from nbtask import App, Settings
from nbtask.brokers.amqp import AmqpTransport
from nbtask.brokers.amqp_link import Link
from nbtask.brokers.amqp_links import Links

pytestmark = pytest.mark.brokers("amqp")


def links_of(app: App) -> Links:
    transport = app.transport
    assert isinstance(transport, AmqpTransport)
    return transport.links


def waiting_in_queue(settings: Settings) -> int:
    """How many messages the default queue holds (no worker reads it in these tests)."""
    with kombu.Connection(AMQP_URL) as conn:
        queue = f"{settings.key_prefix}:q:{settings.default_queue}"
        _, waiting, _ = conn.default_channel.queue_declare(queue=queue, passive=True)
    return int(waiting)


def test_a_flush_leaves_a_live_threads_unconfirmed_sends_to_it_and_takes_them_once_it_ended(
    client: App,
    proxy: TcpProxy,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ledger = str(tmp_path / "ledger")
    links = links_of(client)
    client.send_task(RECORD_ID, (ledger,))
    client.flush()  # this thread's link: connected, nothing owed

    sent, go = threading.Event(), threading.Event()
    theirs: list[Link] = []

    def other() -> None:
        client.send_task(RECORD_ID, (ledger,))  # a link of its own
        client.flush()
        proxy.hold()  # its next messages, and so their confirms, are held back
        for _ in range(3):
            client.send_task(RECORD_ID, (ledger,))  # sent without waiting for the confirm
        link = links.current()
        assert link is not None
        theirs.append(link)
        sent.set()
        go.wait()  # ends without reading the confirms

    thread = threading.Thread(target=other)
    thread.start()
    try:
        assert sent.wait(30)
        taken_over: list[bool] = []
        take_over: Callable[..., object] = links._take_over

        def spied(**kwargs: bool) -> object:
            taken_over.append(True)
            return take_over(**kwargs)

        monkeypatch.setattr(links, "_take_over", spied)
        (link,) = theirs
        assert len(link.confirms.unconfirmed) == 3
        client.flush()
        # Nothing for this thread to do: returned at once, the link left to its thread.
        assert taken_over == []
        assert link.thread is thread and link in links._links
        assert len(link.confirms.unconfirmed) == 3
    finally:
        proxy.release()
        go.set()
        thread.join(30)
    assert not thread.is_alive()

    # Its thread ended: a flush takes the link over, reads the confirms, gives it up.
    client.flush()
    assert taken_over == [True]
    assert link not in links._links and link.confirms.unconfirmed == {}
    assert links.take_unsent() == []
    assert waiting_in_queue(settings) == 5
