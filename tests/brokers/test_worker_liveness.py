"""What the broker tells of a worker whose heartbeat lapsed: does it beat, do its processes read.

Asked before its queues and registry entry are deleted (see ``DeadWorkers``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nbtask import App, Settings
from nbtask.brokers import Transport, open_broker
from nbtask.wire.records import WorkerInfo


@pytest.fixture
def worker_side(settings: Settings) -> Iterator[Transport]:
    """A worker's transport on the test's broker."""
    opened = open_broker(settings, settings.broker_url or "")
    yield opened
    opened.close()


def test_a_heartbeat_shows_a_worker_beating(worker_side: Transport) -> None:
    store = worker_side.store
    assert not store.beats("w")
    store.heartbeat("w", WorkerInfo("host", 1, ("default",), 1, ("w-0",)))
    assert store.beats("w")
    store.end_heartbeat("w")
    assert not store.beats("w")
    assert list(store.dead_workers()) == ["w"]


def test_redis_shows_a_consumer_that_read_the_queue_lately(
    app: App, worker_side: Transport
) -> None:
    worker_side.ensure_queues(["default"])
    app.send_task("tests.sample_tasks.add", (1, 2))
    delivery = worker_side.fetch(["default"], "w-0", 5.0)
    assert delivery is not None
    assert worker_side.still_reading(["w-0", "w-1"], ["default"], 60.0)
    assert not worker_side.still_reading(["w-1"], ["default"], 60.0)
    assert not worker_side.still_reading(["w-0"], ["another"], 60.0)  # no such queue
    assert not worker_side.still_reading(["w-0"], ["default"], 0.0)


@pytest.mark.brokers("amqp")
def test_rabbitmq_never_says_a_consumer_reads(app: App, worker_side: Transport) -> None:
    # A consumer there may be a dead process's connection a fork of it holds open.
    worker_side.ensure_queues(["default"])
    app.send_task("tests.sample_tasks.add", (1, 2))
    delivery = worker_side.fetch(["default"], "w-0", 5.0)
    assert delivery is not None
    assert not worker_side.still_reading(["w-0"], ["default"], 60.0)
