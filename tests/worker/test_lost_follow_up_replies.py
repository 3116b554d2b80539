"""Owed follow-ups whose take's reply was lost are still sent, once. Both brokers.

A task revoked while queued has its follow-ups (its errback) owed in its record; whoever
settles its message takes them in the store, then sends them. When the connection to the
store drops after Redis ran the take, before its reply came, the take is sent again as the
same taker, which takes them again: the errback is sent. Before, the take was refused a
second send (a copy could run twice) and, sent again, found them taken by no one else
than itself: nothing was sent, ever. A replay (another taker) still finds them taken. The
task's stored outcome is read before the take: a store gone at that read leaves them owed.

The process settling the message is this test's, reaching the store through a
:class:`~tcp_proxy.TcpProxy` (``deafen()`` loses Redis's reply while the take reaches it,
``cut()`` then drops the connection); the worker started after it reaches Redis directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from helpers import wait_for_housekeeping, wait_until
from raw_broker import RawBroker
from tcp_proxy import TcpProxy, reply_lost_once

import nbtask
from nbtask import App, Settings
from nbtask.brokers import Transport
from nbtask.core.outgoing import MessageBuilder
from nbtask.wire.envelope import Signer
from nbtask.wire.message import TaskMessage
from nbtask.worker.follow_ups import FollowUps
from nbtask.worker.subtasks import SubtaskPublisher
from tests.celery_tasks import read_records

pytestmark = pytest.mark.brokers


def _follow_ups(settings: Settings, transport: Transport) -> FollowUps:
    """What a worker process follows a settled task up with."""
    signer = Signer.for_settings(settings, settings.secret)
    builder = MessageBuilder(signer, settings, transport.store, through_apps=False)
    return FollowUps(transport, signer, SubtaskPublisher(transport, builder))


@contextlib.contextmanager
def take_reply_lost(
    transport: Transport, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch, done: Callable[[], bool]
) -> Iterator[None]:
    """``reply_lost_once`` from the take on: the stored outcome is read before it, heard."""
    read_record = transport.store.get_record
    with contextlib.ExitStack() as stack:

        def read_then_deafen(task_id: str) -> object:
            record = read_record(task_id)
            stack.enter_context(reply_lost_once(proxy, done))
            return record

        monkeypatch.setattr(transport.store, "get_record", read_then_deafen)
        yield
    monkeypatch.setattr(transport.store, "get_record", read_record)


def test_an_errback_whose_takes_reply_was_lost_is_sent_once(
    app: App,
    access: RawBroker,
    proxied: Transport,
    store_proxy: TcpProxy,
    settings: Settings,
    r: redis.Redis,
    start_worker,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    @app.task
    def step(path: str) -> None:
        from tests.celery_tasks import record

        record(path, step=1)

    @app.task
    def note(value: object, path: str) -> object:
        from tests.celery_tasks import record

        record(path, value=value)
        return value

    calls, ledger = tmp_path / "calls", tmp_path / "ledger"
    h = step.apply_async((str(ledger),), link_error=note.s(str(calls)))
    app.flush()
    wait_until(lambda: access.queued() == 1, 10, "the message on its queue")
    raw = access.peek()
    assert app.revoke(h.id)  # its errback is owed: the revoke stores that, signed
    record = access.keys.record_key(h.id)
    assert r.hget(record, "follow_ups") == b"owed"

    follow_ups = _follow_ups(settings, proxied)
    signer = Signer.for_settings(settings, settings.secret)
    envelope = signer.open(raw)
    message = TaskMessage.from_header(envelope.header)
    links = message.split(envelope)[1]
    assert proxied.store.link.run([("PING",)]) == [b"PONG"]  # connected, and answered on

    def taken() -> bool:
        return bool(r.hget(record, "follow_ups") != b"owed")

    with take_reply_lost(proxied, store_proxy, monkeypatch, taken):
        assert follow_ups.run_owed(message, links) is True  # (before: BrokerUnavailable)
    # A replay's take (another process's) finds them taken.
    assert _follow_ups(settings, proxied).run_owed(message, links) is False

    start_worker(concurrency=1)  # runs the errback; drops the revoked task's message
    wait_until(lambda: bool(read_records(calls)), 30, "the errback to run")
    with pytest.raises(nbtask.TaskRevoked):
        h.get(timeout=20)
    wait_until(access.drained, 30, "the revoked task's message dropped")
    wait_for_housekeeping(app)
    assert [c["value"] for c in read_records(calls)] == [h.id]
    assert read_records(ledger) == []


def test_owed_follow_ups_are_not_taken_while_their_outcome_cannot_be_read(
    app: App,
    access: RawBroker,
    proxied: Transport,
    store_proxy: TcpProxy,
    settings: Settings,
    r: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # The store goes away just as the settling process reads the task's stored outcome.
    # Before, the follow-ups were taken first: taken, then never sent by anyone (a later
    # settle of the message found them taken).
    @app.task
    def step(path: str) -> None:
        from tests.celery_tasks import record

        record(path, step=1)

    h = step.apply_async((str(tmp_path / "ledger"),), link_error=step.s(str(tmp_path / "x")))
    app.flush()
    wait_until(lambda: access.queued() == 1, 10, "the message on its queue")
    raw = access.peek()
    assert app.revoke(h.id)  # its errback is owed
    record = access.keys.record_key(h.id)
    envelope = Signer.for_settings(settings, settings.secret).open(raw)
    message = TaskMessage.from_header(envelope.header)
    links = message.split(envelope)[1]
    read_record = proxied.store.get_record

    def read_as_the_store_goes_away(task_id: str) -> object:
        store_proxy.refuse()
        return read_record(task_id)

    monkeypatch.setattr(proxied.store, "get_record", read_as_the_store_goes_away)
    with pytest.raises(nbtask.BrokerUnavailable):
        _follow_ups(settings, proxied).run_owed(message, links)
    assert r.hget(record, "follow_ups") == b"owed"  # (before: taken)
    monkeypatch.undo()
    store_proxy.accept_again()
    assert _follow_ups(settings, proxied).run_owed(message, links) is True
    assert r.hget(record, "follow_ups") != b"owed"
