"""Task ids used again (``task_id=...``, once the earlier task's record is gone), and an
outsider with write access to the broker but not the secret who puts the earlier task's
genuine, signed events and results where the later task's are read. Both brokers."""

from __future__ import annotations

import logging
import uuid

import pytest
from helpers import wait_until
from raw_broker import RawBroker

from nbtask import App

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
    worker = start_worker(concurrency=1)
    first = (add.s(2, 3) | add.s(1).set(task_id=later)).delay()
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
