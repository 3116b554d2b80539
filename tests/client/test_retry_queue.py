"""A task retried onto another queue (``self.retry(queue=...)``, as in Celery) is followed
there: its handle, its record and a handle re-attached by id name the queue the retry
sent it to, not the one it was first sent to. What a handle says while that queue's
worker is dead is in ``test_lost_reasons``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import cast

import pytest
from helpers import wait_until

import nbtask
from nbtask import App, Settings, State
from nbtask.core.handle import Client, StartedBy, TaskHandle
from nbtask.wire.events import Event, EventType

pytestmark = pytest.mark.brokers


def _pids_in(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def test_a_task_retried_on_another_queue_is_on_that_queue_in_its_record_and_handles(
    app: App, settings: Settings, start_worker, tmp_path: Path
) -> None:
    """Sent to 'default', retried to 'second': while its rerun runs there, its handle,
    its record and a handle another client re-attached by id say 'second'. All three
    said 'default'."""
    start_worker(concurrency=1)
    start_worker("-Q", "second", concurrency=1)
    marker, go = tmp_path / "marker", tmp_path / "go"

    @app.task(bind=True, max_retries=1)
    def moves(self: nbtask.Task, path: str, go: str) -> str:
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")
        if self.request.retries == 0:
            raise self.retry(countdown=0, queue="second")
        while not os.path.exists(go):
            time.sleep(0.01)
        return str(self.request.delivery_info["queue"])

    h = moves.delay(str(marker), str(go))
    wait_until(lambda: len(_pids_in(marker)) == 2, 30, "the rerun to start")
    wait_until(lambda: h.info.get("pid") == _pids_in(marker)[1], 20, "its start to be seen")
    assert h.state is State.STARTED
    record = app.store.get_record(h.id)
    assert record is not None and record.state is State.STARTED
    other = App("other", settings=settings)
    try:
        reattached = other.handle(h.id)
        assert (h.queue, record.queue, reattached.queue) == ("second", "second", "second")
    finally:
        other.close()
    go.touch()
    assert h.get(timeout=20) == "second"


def test_a_task_retried_onto_a_queue_no_worker_consumes_says_so_while_it_waits(
    app: App, start_worker
) -> None:
    """Retried to 'nowhere', which no live worker consumes: while it waits there its
    waiting reason says so, as a task first sent there does. Before, a task waiting for
    its retry gave no reason at all."""
    start_worker(concurrency=1)

    @app.task(bind=True, max_retries=1)
    def strands(self: nbtask.Task) -> int:
        raise self.retry(countdown=0, queue="nowhere")

    h = strands.delay()
    wait_until(lambda: h.state is State.RETRY, 20, "the retry")
    assert h.queue == "nowhere"
    wait_until(
        lambda: h.waiting_reason == "no live worker consumes queue 'nowhere'",
        10,
        "the waiting reason to name the queue",
    )
    h.revoke()


class _Asked:
    """A client that records what a handle asks it about its task's wait."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, StartedBy | None]] = []

    def waiting_reason(self, queue: str, started_by: StartedBy | None = None) -> str:
        self.asked.append((queue, started_by))
        return "asked"


def test_a_handle_takes_the_queue_its_retry_event_names() -> None:
    """Client side alone: a RETRY event naming its queue moves the handle there, and what
    the handle asks about its next run names that queue, sure of it. One naming none (a
    worker of an older nbtask) leaves the queue, and says the retry may have named
    another. Before, the handle kept its first queue whatever the retry named."""
    asked = _Asked()
    handle = TaskHandle(cast(Client, asked), "t1", "moves", "default")
    whoami = {"worker": "host", "pid": 7}
    retry = {**whoami, "started_at": 100.0, "reason": "not yet", "retries": 1, "eta": 100.0}
    handle.apply(Event(EventType.RETRY, "t1", 2, {**retry, "queue": "second"}))
    assert handle.queue == "second"
    handle.apply(Event(EventType.STARTED, "t1", 1_000_001, {**whoami, "started_at": 101.0}))
    assert handle.waiting_reason == "asked"
    assert asked.asked[-1] == ("second", StartedBy("t1", "host", 7, 101.0, False))

    unnamed = {**retry, "started_at": 101.0, "retries": 2}
    handle.apply(Event(EventType.RETRY, "t1", 1_000_002, unnamed))
    handle.apply(Event(EventType.STARTED, "t1", 2_000_001, {**whoami, "started_at": 102.0}))
    assert handle.waiting_reason == "asked"
    assert asked.asked[-1] == ("second", StartedBy("t1", "host", 7, 102.0, True))
