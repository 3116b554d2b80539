"""Unconfirmed sends of a thread that ended, or of a live thread whose link dropped, on the
real RabbitMQ: another thread's flush, or closing the app, sends them again (a Ctrl-C
meanwhile loses none), or revokes them if RabbitMQ is gone or silent.

The client reaches RabbitMQ through a :class:`~tcp_proxy.TcpProxy`; ``deafen()`` makes
it lose every confirm on the way back while its messages still reach RabbitMQ, ``hold()``
keeps its messages from reaching RabbitMQ at all. Workers and the store are reached
directly. Confirms themselves are tested in ``test_amqp_confirms.py``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import kombu
import pytest
from helpers import AMQP_URL, RECORD_ID, ledger_runs
from tcp_proxy import TcpProxy, on_a_thread, via

from nbtask import App, State, TaskHandle
from nbtask.brokers.amqp_link import Link
from nbtask.brokers.amqp_links import Links
from nbtask.errors import BrokerUnavailable, TaskRevoked

pytestmark = pytest.mark.brokers("amqp")


def _send_from_a_thread_that_ends(
    client: App, proxy: TcpProxy, ledger: Path, outage: Callable[[], None], *, read: bool
) -> list[TaskHandle]:
    """On a thread of its own: send tasks whose messages never reach RabbitMQ, and end;
    with ``read``, after finding the connection dropped in a read (a purge), not a send.
    The tasks' handles (the first one's message was confirmed)."""
    handles: list[TaskHandle] = []
    failed: list[BrokerUnavailable] = []

    def run() -> None:
        handles.append(client.send_task(RECORD_ID, (str(ledger),)))  # its own connection
        client.flush()
        proxy.hold()  # the messages below never reach RabbitMQ
        handles.extend(client.send_task(RECORD_ID, (str(ledger),)) for _ in range(5))
        outage()
        if read:
            try:
                client.purge(["elsewhere"])
            except BrokerUnavailable as exc:
                failed.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert len(handles) == 6 and len(failed) == int(read)
    return handles


@pytest.mark.parametrize("read", [True, False], ids=["failed-read", "link-left-open"])
def test_unconfirmed_sends_of_a_thread_that_ended_are_sent_again_by_another(
    client: App, proxy: TcpProxy, start_worker, tmp_path: Path, read: bool
) -> None:
    """What a thread that ended left unconfirmed (kept for its next send, or on its
    connection) is sent again by another thread's flush (here its ``get()``)."""
    ledger = tmp_path / "ledger"
    first = client.send_task(RECORD_ID, (str(ledger),))
    client.flush()
    handles = [first, *_send_from_a_thread_that_ends(client, proxy, ledger, proxy.cut, read=read)]
    start_worker(concurrency=2)
    assert [h.get(timeout=30) for h in handles] == [h.id for h in handles]
    assert ledger_runs(ledger) == {h.id: 1 for h in handles}


@pytest.mark.parametrize("read", [True, False], ids=["failed-read", "link-left-open"])
def test_unconfirmed_sends_of_a_thread_that_ended_are_revoked_if_rabbitmq_is_gone(
    client: App, proxy: TcpProxy, tmp_path: Path, read: bool
) -> None:
    ledger = tmp_path / "ledger"
    client.send_task(RECORD_ID, (str(ledger),))
    client.flush()
    _, *lost = _send_from_a_thread_that_ends(client, proxy, ledger, proxy.refuse, read=read)
    with pytest.raises(BrokerUnavailable, match="cannot reach the AMQP broker"):
        client.flush()
    for handle in lost:
        with pytest.raises(TaskRevoked, match="not confirmed by the broker"):
            handle.get(timeout=5)
        assert client.store.get_record(handle.id).state is State.REVOKED


def test_a_flush_taking_over_a_thread_that_ended_gives_up_on_a_silent_rabbitmq(
    client: App, proxy: TcpProxy, tmp_path: Path
) -> None:
    """A thread that ended left messages RabbitMQ never confirmed on its connection, and
    RabbitMQ says nothing more (stalled, or the network path is dead): another thread's
    flush waited for their confirms for ever. It now gives up after a few seconds with
    ``BrokerUnavailable``, and the tasks, in doubt, are revoked."""
    ledger = tmp_path / "ledger"
    _, *lost = _send_from_a_thread_that_ends(client, proxy, ledger, lambda: None, read=False)
    raised = on_a_thread(client.flush, cut=proxy)
    assert isinstance(raised, BrokerUnavailable), repr(raised)
    assert "did not answer within" in str(raised)
    for handle in lost:
        with pytest.raises(TaskRevoked, match="not confirmed by the broker"):
            handle.get(timeout=5)
        assert client.store.get_record(handle.id).state is State.REVOKED


def _interrupt_once(
    monkeypatch: pytest.MonkeyPatch, owner: type, name: str, *, after: bool
) -> None:
    """Make the next call of ``owner.name`` by this thread raise KeyboardInterrupt (a
    Ctrl-C at that point): before it runs, or once it has run (``after``). Other threads
    (the client's listener, whose connection the test cuts too) are left alone, as a
    Ctrl-C leaves them."""
    real = getattr(owner, name)
    fired: list[bool] = []
    me = threading.current_thread()

    def interrupted(self: object, *args: object) -> object:
        if fired or threading.current_thread() is not me:
            return real(self, *args)
        if not after:
            fired.append(True)
            raise KeyboardInterrupt
        real(self, *args)
        fired.append(True)
        raise KeyboardInterrupt

    monkeypatch.setattr(owner, name, interrupted)


@pytest.mark.parametrize(
    ("owner", "name", "after"),
    [(Links, "_collect", False), (Link, "close", False), (Link, "publish", True)],
    ids=["reading-its-confirms", "closing-it", "sending-them-again"],
)
def test_a_ctrl_c_while_a_thread_that_ended_is_taken_over_loses_none_of_its_sends(
    client: App,
    proxy: TcpProxy,
    start_worker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    owner: type,
    name: str,
    after: bool,
) -> None:
    """A Ctrl-C while a flush takes over the link a thread that ended left with messages
    unconfirmed (reading their confirms, closing it, sending them again): the next flush
    sends them, and each task runs once."""
    ledger = tmp_path / "ledger"
    first = client.send_task(RECORD_ID, (str(ledger),))
    client.flush()
    handles = [first, *_send_from_a_thread_that_ends(client, proxy, ledger, proxy.cut, read=False)]
    _interrupt_once(monkeypatch, owner, name, after=after)
    with pytest.raises(KeyboardInterrupt):
        client.flush()
    monkeypatch.undo()
    client.flush()
    start_worker(concurrency=2)
    assert [h.get(timeout=20) for h in handles] == [h.id for h in handles]
    assert ledger_runs(ledger) == {h.id: 1 for h in handles}


@pytest.mark.parametrize("by", ["close", "its-own-flush", "close-with-rabbitmq-gone"])
def test_unconfirmed_sends_of_a_live_thread_whose_link_dropped_in_a_read_are_sent(
    client: App, proxy: TcpProxy, app: App, start_worker, tmp_path: Path, by: str
) -> None:
    """A thread still alive found its connection dropped in a read (a purge), with tasks
    sent and unconfirmed: ``app.close()`` from another thread, or the thread's own
    ``app.flush()``, sends them again, and each runs once; if RabbitMQ cannot be reached,
    ``app.close()`` revokes them."""
    ledger = tmp_path / "ledger"
    handles: list[TaskHandle] = []
    failed: list[BrokerUnavailable] = []
    dropped, flush, flushed, finish = (threading.Event() for _ in range(4))
    outage = proxy.refuse if by == "close-with-rabbitmq-gone" else proxy.cut

    def run() -> None:
        handles.append(client.send_task(RECORD_ID, (str(ledger),)))
        client.flush()
        proxy.hold()  # the messages below never reach RabbitMQ
        handles.extend(client.send_task(RECORD_ID, (str(ledger),)) for _ in range(5))
        outage()
        try:
            client.purge(["elsewhere"])
        except BrokerUnavailable as exc:
            failed.append(exc)
        dropped.set()
        if by == "its-own-flush" and flush.wait(30):
            client.flush()
            flushed.set()
        finish.wait(30)  # alive until the app is closed

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert dropped.wait(30) and len(failed) == 1
        if by == "its-own-flush":
            flush.set()
            assert flushed.wait(30)
        client.close()
    finally:
        flush.set()
        finish.set()
        thread.join(30)
    if by == "close-with-rabbitmq-gone":
        assert [app.store.get_record(h.id).state for h in handles[1:]] == [State.REVOKED] * 5
        return
    start_worker(concurrency=2)
    assert [app.handle(h.id).get(timeout=20) for h in handles] == [h.id for h in handles]
    assert ledger_runs(ledger) == {h.id: 1 for h in handles}


@pytest.mark.parametrize("reachable", [True, False], ids=["sent", "rabbitmq-gone"])
def test_closing_sends_what_a_live_threads_dropped_connection_left_unconfirmed(
    proxy: TcpProxy, prefix: str, caplog: pytest.LogCaptureFixture, reachable: bool
) -> None:
    """A thread still alive found its connection dropped in a read, with messages sent
    and unconfirmed, kept for its next connection to send. Closing the connections from
    another thread sends them; if RabbitMQ cannot be reached, it names their tasks in
    the log rather than forget them without a word."""
    caplog.set_level(logging.ERROR, logger="nbtask")
    links = Links(via(AMQP_URL, proxy.url_port))
    queue = f"{prefix}:orphans"
    direct = kombu.Connection(AMQP_URL)
    direct.default_channel.queue_declare(queue=queue, auto_delete=False)
    dropped, finish = threading.Event(), threading.Event()
    failed: list[BrokerUnavailable] = []

    def send(task_id: str, *, wait: bool) -> None:
        def publish(link: Link) -> None:
            links.send(link, queue, task_id.encode(), persistent=False, task_id=task_id)

        links.publishing(publish, wait=wait)

    def run() -> None:
        send("first", wait=True)
        proxy.hold()  # the messages below never reach RabbitMQ
        for i in range(3):
            send(f"task-{i}", wait=False)
        if reachable:
            proxy.cut()
        else:
            proxy.refuse()
        try:
            with links.using() as link:
                link.conn.drain_events(timeout=10)  # a read finds the connection gone
        except BrokerUnavailable as exc:
            failed.append(exc)
        dropped.set()
        finish.wait(30)  # alive while the connections are closed

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert dropped.wait(30) and len(failed) == 1
        links.close()
    finally:
        finish.set()
        thread.join(30)
        got = _taken(direct, queue)
        direct.default_channel.queue_delete(queue)
        direct.release()
    errors = [r.getMessage() for r in caplog.records if "not confirm" in r.getMessage()]
    if reachable:
        assert got == [b"first", b"task-0", b"task-1", b"task-2"]
        assert errors == []
    else:
        assert got == [b"first"]
        assert len(errors) == 1 and all(f"task-{i}" in errors[0] for i in range(3)), errors


def _taken(conn: kombu.Connection, queue: str) -> list[bytes]:
    """The bodies of the messages waiting on ``queue``, taken off it."""
    out: list[bytes] = []
    while (message := conn.default_channel.basic_get(queue, no_ack=True)) is not None:
        out.append(bytes(message.body))
    return out
