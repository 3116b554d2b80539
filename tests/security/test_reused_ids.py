"""Task ids used again (``task_id=...``, once the earlier task's record is gone), and an
outsider with write access to the broker but not the secret who puts the earlier task's
genuine, signed events and results where the later task's are read. Both brokers."""

from __future__ import annotations

import logging
import time
import uuid

import pytest
from helpers import wait_until
from raw_broker import RawBroker

from nbtask import App, Settings, SignatureError
from nbtask.wire.events import Event, EventType
from nbtask.wire.message import encode_value

pytestmark = pytest.mark.brokers


def _steps(app: App):
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    return add


def _free(access: RawBroker, task_id: str) -> None:
    """Forget a task as its ``result_ttl`` passing does: the id may be used again."""
    access.store.delete(access.keys.record_key(task_id))
    access.store.zrem(access.keys.done_key, task_id)


def test_an_earlier_chains_final_event_does_not_end_a_later_step_reusing_its_id(
    app: App, access: RawBroker, start_worker, caplog: pytest.LogCaptureFixture
) -> None:
    """A chain's later step is sent by a worker, so its client cannot know the signed
    ``created`` of its message: the client stamps the send itself, in the signed chain,
    and the step's events name that stamp."""
    caplog.set_level(logging.WARNING, logger="nbtask.client.listener")
    add = _steps(app)
    later = uuid.uuid4().hex
    first = (add.s(2, 3) | add.s(1).set(task_id=later)).delay()
    # Its events come live only: on RabbitMQ, one kept before the client's reply queue
    # began comes from the stream's catch-up, and a copy put on the queue later is taken
    # for its live copy (dropped, no log line).
    access.wait_for_channel(app.channel)
    worker = start_worker(concurrency=1)
    assert first.get(timeout=15) == 6
    earlier = access.store.hget(access.keys.record_key(later), "result")
    assert earlier
    _free(access, later)
    worker.stop()

    # The same chain again, its first step waiting for a worker.
    again = (add.s(10, 20).set(queue="later") | add.s(1).set(task_id=later)).delay()
    assert again.id == later
    access.push_event(app.channel, earlier)

    def dropped() -> list[str]:
        return [r.getMessage() for r in caplog.records if "dropped an event" in r.getMessage()]

    wait_until(lambda: again.done() or bool(dropped()), 15, "the earlier event read")
    assert not again.done(), f"an earlier chain's event ended the step: {again.state}"
    assert "another send of a task with that id" in dropped()[0]
    start_worker("-Q", "later,default", concurrency=1)
    assert again.get(timeout=15) == 31


ADD = "tests.sample_tasks.add"


def _used_and_freed(app: App, access: RawBroker) -> tuple[str, bytes, bytes]:
    """A task id used once (``add(2, 3)``) and freed: its stored result and ``sent``."""
    task_id = uuid.uuid4().hex
    assert app.send_task(ADD, (2, 3), task_id=task_id).get(timeout=15) == 5
    fields = access.record(task_id)
    _free(access, task_id)
    return task_id, fields[b"result"], fields[b"sent"]


def _outcome_stored_long_ago(app: App, task_id: str, sent: bytes, value: int) -> bytes:
    """The genuine SUCCESS its worker stored for the send ``sent`` of ``task_id``, when
    that was more than ``result_ttl`` ago (a test cannot wait a day for one)."""
    when = time.time() - app.settings.result_ttl - 3600
    run = (app.settings.key_prefix, float(sent))
    event = Event(EventType.SUCCESS, task_id, 1, {"runtime": 0.1}, when, run)
    return app.signer.seal(event.to_header(), encode_value(value, "cloudpickle", "result"))


def _reader(settings: Settings) -> App:
    """Another process's app, re-attaching by id."""
    return App("reader", settings=settings)


def test_reattach_refuses_an_earlier_sends_result_put_back_with_its_send(
    app: App, settings: Settings, access: RawBroker, start_worker
) -> None:
    """The record's ``sent`` is unsigned: rewritten with the stored result to an earlier
    send's, a re-attached handle took that send's result. The send is now the newest one
    signed facts name (the task's events kept on its client's channel, its outcome), so
    the earlier send's result is refused."""
    start_worker(concurrency=1)
    task_id, earlier, earlier_sent = _used_and_freed(app, access)
    assert app.send_task(ADD, (10, 20), task_id=task_id).get(timeout=15) == 30
    access.store.hset(
        access.keys.record_key(task_id), mapping={"result": earlier, "sent": earlier_sent}
    )
    _reattaching_is_refused(settings, task_id, "another send")


def test_reattach_refuses_a_result_older_than_result_ttl_with_nothing_newer_kept(
    app: App, settings: Settings, access: RawBroker, start_worker
) -> None:
    """The same with the record's client rewritten to a channel that keeps nothing: no
    signed fact names the later send. An outcome made more than ``result_ttl`` ago
    cannot be in a record (records go ``result_ttl`` after their outcome, and an id is
    used again only once its record is gone): it is refused."""
    start_worker(concurrency=1)
    task_id, _, earlier_sent = _used_and_freed(app, access)
    assert app.send_task(ADD, (10, 20), task_id=task_id).get(timeout=15) == 30
    old = _outcome_stored_long_ago(app, task_id, earlier_sent, 5)
    fields = {"result": old, "sent": earlier_sent, "client": access.keys.channel_key("0ff")}
    access.store.hset(access.keys.record_key(task_id), mapping=fields)
    _reattaching_is_refused(settings, task_id, "result_ttl")


def test_a_reattached_handle_follows_the_running_send_whatever_its_record_says(
    app: App,
    settings: Settings,
    access: RawBroker,
    start_worker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A task reusing an id waits for a worker; its record's ``sent`` is rewritten to the
    earlier send's (another client's), and that send's old outcome put on the channel of
    the task's client. A handle
    re-attached then took that outcome; once the task ran, its own events, naming a
    send the record no longer did, would have been dropped. Now the old outcome is
    dropped (one log line) and the handle takes the task's own result."""
    caplog.set_level(logging.WARNING, logger="nbtask.client.listener")
    worker = start_worker(concurrency=1)
    earlier_client = _reader(settings)  # its events are not on this client's channel
    try:
        task_id, _, earlier_sent = _used_and_freed(earlier_client, access)
    finally:
        earlier_client.close()
    worker.stop()
    h = app.send_task(ADD, (10, 20), task_id=task_id, queue="later")  # no worker there yet
    app.flush()
    access.store.hset(access.keys.record_key(task_id), "sent", earlier_sent)
    # On the channel's stream in the store, where a re-attached handle reads (on RabbitMQ,
    # the client's own reply queue is read by that client alone).
    old = _outcome_stored_long_ago(app, task_id, earlier_sent, 5)
    access.store.xadd(app.channel, {"e": old})
    reader = _reader(settings)
    try:
        again = reader.handle(task_id)

        def dropped() -> list[str]:
            return [r.getMessage() for r in caplog.records if "result_ttl" in r.getMessage()]

        wait_until(lambda: again.done() or bool(dropped()), 15, "the old outcome read")
        assert not again.done(), f"re-attached to the earlier send's outcome: {again.state}"
        start_worker("-Q", "later", concurrency=1)
        assert h.get(timeout=15) == 30
        assert again.get(timeout=15) == 30
    finally:
        reader.close()


def _reattaching_is_refused(settings: Settings, task_id: str, why: str) -> None:
    """A client re-attaching to ``task_id`` gets a SignatureError matching ``why``."""
    reader = _reader(settings)
    try:
        with pytest.raises(SignatureError, match=why):
            value = reader.handle(task_id).get(timeout=5)
            pytest.fail(f"re-attached to the earlier send's result {value}, not 30")
    finally:
        reader.close()
