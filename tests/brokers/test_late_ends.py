"""A task's end that comes after the task was reported lost: not kept, and said.

A worker that stopped answering for a while (paused, or cut off) past the visibility
timeout has its tasks reported lost (``WORKER_LOST``) by another worker; continued, it
may still run one to its end. That outcome is not stored (a final state stays final) and
the worker's log says so, from the answer of the very write that stores an end.
"""

from __future__ import annotations

import logging
import time

import pytest
from raw_broker import RawBroker

from nbtask import App, State
from nbtask.brokers.handoffs import Settlement
from nbtask.wire.events import FINAL_SEQ, Event, EventType
from nbtask.wire.records import final_fields

pytestmark = pytest.mark.brokers

ADD = "tests.sample_tasks.add"


@pytest.mark.parametrize("fetch_next", [False, True])
def test_an_end_after_the_task_was_reported_lost_is_not_kept_and_is_said(
    app: App, access: RawBroker, caplog: pytest.LogCaptureFixture, fetch_next: bool
) -> None:
    transport = app.transport
    queue = [app.settings.default_queue]
    transport.ensure_queues(queue)  # (as a worker does)
    h = app.send_task(ADD, (1, 2))
    app.flush()
    taken = transport.fetch(queue, "c1", 5.0)
    assert taken is not None and taken.task_id == h.id
    # Another worker reported it lost meanwhile: its signed event, stored and sent.
    run = (app.settings.key_prefix, h.sent)
    report = Event(EventType.WORKER_LOST, h.id, FINAL_SEQ, {"reason": "lost"}, run=run)
    raw = app.signer.seal(report.to_header())
    lost = final_fields(State.WORKER_LOST, raw, time.time())
    assert app.store.settle(Settlement(h.id, app.channel, raw, lost)) == ""
    # Its ended-task entry gone (as anyone with write access can make it): the stored
    # signed outcome still refuses the late end, which puts the entry back.
    access.store.zrem(access.keys.done_key, h.id)
    ended = final_fields(State.SUCCESS, b"done", time.time())
    then_fetch = (queue, "c1", 0.1) if fetch_next else None
    with caplog.at_level(logging.WARNING, logger="nbtask"):
        transport.finish(taken, h.id, app.channel, b"done", ended, then_fetch=then_fetch)
    said = [r.getMessage() for r in caplog.records if h.id in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith(f"task {h.id} ended (SUCCESS) after it had been reported lost: ")
    assert "not kept (the record stays WORKER_LOST)" in said[0] and "paused" in said[0]
    record = app.store.get_record(h.id)
    assert record is not None and record.state == "WORKER_LOST"
    assert access.store.zscore(access.keys.done_key, h.id) is not None
    # Stored once: a second report of the same loss is no late end, and is not said.
    caplog.clear()
    assert app.store.settle(Settlement(h.id, app.channel, raw, lost)) == "WORKER_LOST"
    assert not [r for r in caplog.records if h.id in r.getMessage()]
