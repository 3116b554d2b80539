"""``app.expect`` of a task that already ended: the handle takes the stored outcome.

A task's end goes to its client's channel once; read while no handle was registered for
it (a ``link`` callback that ended before ``app.expect`` was called), it reached none.
The task's record keeps the outcome, whichever broker carries the events.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from helpers import wait_until

from nbtask import App
from nbtask.wire.events import FINAL_STATES

pytestmark = pytest.mark.brokers


def test_a_link_expected_after_it_ended_reads_its_outcome(app: App, start_worker: Any) -> None:
    start_worker(concurrency=1)

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    @app.task
    def shout(value: int) -> int:
        print("link prints", value)
        return value

    linked = uuid.uuid4().hex
    assert add.apply_async((1, 2), link=shout.s().set(task_id=linked)).get(timeout=10) == 3

    def link_stored() -> bool:
        record = app.store.get_record(linked)
        return record is not None and record.state in FINAL_STATES

    wait_until(link_stored, 10, "the link's outcome in its record")
    # One worker process: it sent this client the link's end before it took this task,
    # so once this result is read, the link's end was read too, with no handle for it.
    assert add.delay(0, 0).get(timeout=10) == 0

    follow = app.expect(linked, shout.name)
    assert follow.ready(), follow.state
    assert follow.get(timeout=1) == 3
    assert follow.stdout == "link prints 3\n"
