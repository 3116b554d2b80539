"""Owed follow-ups whose take's reply was lost are still sent, once. Both brokers.

A task revoked while queued has its follow-ups (its errback) owed in its record; whoever
settles its message takes them in the store, then sends them. When the connection to the
store drops after Redis ran the take, before its reply came, the take is sent again as the
same taker, which takes them again: the errback is sent. Before, the take was refused a
second send (a copy could run twice) and, sent again, found them taken by no one else
than itself: nothing was sent, ever. A replay (another taker) still finds them taken.

The process settling the message is this test's, reaching the store through a
:class:`~tcp_proxy.TcpProxy` (``deafen()`` loses Redis's reply while the take reaches it,
``cut()`` then drops the connection); the worker started after it reaches Redis directly.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import wait_for_housekeeping, wait_until
from raw_broker import RawBroker
from tcp_proxy import TcpProxy, reply_lost_once

import nbtask
from nbtask import App, Settings
from nbtask.brokers import Transport
from nbtask.core.outgoing import MessageBuilder
from nbtask.wire.envelope import Buffer, Signer
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


def _revoked_owing(
    app: App, access: RawBroker, settings: Settings, task: Any, errback: Any, path: Path
) -> tuple[Any, TaskMessage, Buffer]:
    """``task`` queued, then revoked: its errback owed. Its handle, message and links."""
    h = task.apply_async((str(path),), link_error=errback)
    app.flush()
    wait_until(lambda: access.queued() == 1, 10, "the message on its queue")
    raw = access.peek()
    assert app.revoke(h.id)  # its errback is owed: the revoke stores that, signed
    envelope = Signer.for_settings(settings, settings.secret).open(raw)
    message = TaskMessage.from_header(envelope.header)
    return h, message, message.split(envelope)[1]


def test_an_errback_whose_takes_reply_was_lost_is_sent_once(
    app: App,
    access: RawBroker,
    proxied: Transport,
    store_proxy: TcpProxy,
    settings: Settings,
    r: redis.Redis,
    start_worker,
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
    h, message, links = _revoked_owing(app, access, settings, step, note.s(str(calls)), ledger)
    record = access.keys.record_key(h.id)
    assert r.hget(record, "follow_ups") == b"owed"

    follow_ups = _follow_ups(settings, proxied)
    assert proxied.store.link.run([("PING",)]) == [b"PONG"]  # connected, and answered on
    with reply_lost_once(store_proxy, lambda: r.hget(record, "follow_ups") != b"owed"):
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


def test_owed_follow_ups_taken_as_the_store_goes_away_are_sent_once_it_is_back(
    app: App,
    access: RawBroker,
    proxied: Transport,
    store_proxy: TcpProxy,
    settings: Settings,
    r: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # The store goes away just after the take, as the task's stored outcome is read.
    # Before, the read was not made again: the follow-ups were taken, and never sent.
    @app.task
    def step(path: str) -> None:
        from tests.celery_tasks import record

        record(path, step=1)

    errback = step.s(str(tmp_path / "x"))
    h, message, links = _revoked_owing(app, access, settings, step, errback, tmp_path / "ledger")
    read_record = proxied.store.get_record
    back = threading.Timer(1.0, store_proxy.accept_again)

    def read_as_the_store_goes_away(task_id: str) -> object:
        if not back.is_alive() and not back.finished.is_set():
            store_proxy.refuse()
            back.start()
        return read_record(task_id)

    monkeypatch.setattr(proxied.store, "get_record", read_as_the_store_goes_away)
    try:
        assert _follow_ups(settings, proxied).run_owed(message, links) is True
    finally:
        back.join(10)
    assert back.finished.is_set()  # the store was away at the read
    assert r.hget(access.keys.record_key(h.id), "follow_ups") != b"owed"
    wait_until(lambda: access.queued() == 2, 10, "the errback sent")


def test_a_replayed_message_of_a_task_owing_nothing_reads_no_outcome(
    app: App,
    access: RawBroker,
    proxied: Transport,
    settings: Settings,
    r: redis.Redis,
    start_worker,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A genuine message of a task that ended, handled again (anyone with write access to
    # the queue can put it back, as often as they like): nothing is owed, so its stored
    # result is neither fetched nor loaded, and nothing is logged as wrong with it.
    @app.task(ignore_result=True)
    def quiet() -> int:
        return 1

    h = quiet.delay()
    app.flush()
    wait_until(lambda: access.queued() == 1, 10, "the message on its queue")
    raw = access.peek()
    start_worker(concurrency=1)
    record = access.keys.record_key(h.id)
    wait_until(lambda: r.hget(record, "state") == b"SUCCESS", 30, "the task to end")
    envelope = Signer.for_settings(settings, settings.secret).open(raw)
    message = TaskMessage.from_header(envelope.header)
    reads: list[str] = []
    read_record = proxied.store.get_record
    monkeypatch.setattr(proxied.store, "get_record", lambda i: reads.append(i) or read_record(i))
    with caplog.at_level(logging.ERROR, logger="nbtask"):
        assert _follow_ups(settings, proxied).run_owed(message, message.split(envelope)[1]) is None
    assert reads == []  # (read first, it was fetched and loaded at every replay)
    assert not caplog.records, [rec.getMessage() for rec in caplog.records]
