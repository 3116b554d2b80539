"""Garbage planted in the worker registry is said once, not at every sweep that meets it.

A live worker's entry nbtask cannot read (garbage, and a heartbeat key planted without
an expiry) keeps supervisors from settling lost deliveries: what that worker runs is
unknown. They look again at every sweep (a heartbeat, a visibility timeout), and a client
reads the registry every few seconds; each said why at every look, for as long as the
garbage stayed. The store is Redis on both brokers: the looks are run here directly.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import pytest
import redis
from helpers import task_header
from raw_broker import RawBroker

from nbtask import App
from nbtask.brokers import Delivery
from nbtask.brokers.amqp_lost import LostDeliveries
from nbtask.worker.lost import LostTasks

pytestmark = pytest.mark.brokers("redis")

SWEEPS = 5


@pytest.fixture
def garbage_worker(r: redis.Redis, prefix: str) -> Iterator[str]:
    """A live worker's registry entry that cannot be read, there until the test ends."""
    r.hset(f"{prefix}:workers", "planted", b"\xff not json")
    r.set(f"{prefix}:hb:planted", b"1")  # no expiry: live for as long as it is there
    yield "planted"
    r.delete(f"{prefix}:hb:planted")


def _said(caplog: pytest.LogCaptureFixture, words: str) -> int:
    return sum(words in record.getMessage() for record in caplog.records)


def test_a_delivery_left_for_a_garbage_entry_is_said_once_not_at_every_sweep(
    app: App, access: RawBroker, garbage_worker: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A supervisor's look at a lost delivery, each visibility timeout (Redis Streams)."""
    caplog.set_level(logging.WARNING, logger="nbtask")
    store = access.keys

    def running() -> set[str] | None:  # as the supervisor reads it
        return None if store.workers_if_known() is None else set()

    lost = LostTasks(access.streams, app.signer, app.settings, running)
    header = task_header(app, "t-left", "tests.sample_tasks.add")
    delivery = Delivery("default", "1-0", app.signer.seal(header), 1, task_id="t-left")
    for _ in range(SWEEPS):
        lost.settle(delivery, "its worker process died")
    assert _said(caplog, "left task t-left's delivery unsettled") == 1  # (before: 5)
    # Another task's delivery is said once too.
    other = Delivery("default", "2-0", app.signer.seal({**header, "id": "t-other"}), 1)
    lost.settle(other, "its worker process died")
    assert _said(caplog, "left task t-other's delivery unsettled") == 1


def test_lost_deliveries_left_unclaimed_for_a_garbage_entry_are_said_once_until_they_change(
    access: RawBroker, garbage_worker: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A supervisor's claim of parked lost deliveries, at each heartbeat (RabbitMQ)."""
    caplog.set_level(logging.WARNING, logger="nbtask")
    lost = LostDeliveries(access.keys)
    lost.park("t-lost", b"signed message", "default", 1)
    for _ in range(SWEEPS):
        assert lost.claim(None, ["default"]) == []
    assert _said(caplog, "1 lost delivery(ies) left unclaimed") == 1  # (before: 5)
    lost.park("t-lost-too", b"signed message", "default", 1)
    for _ in range(SWEEPS):
        assert lost.claim(None, ["default"]) == []
    assert _said(caplog, "2 lost delivery(ies) left unclaimed") == 1


def test_a_registry_of_another_type_is_said_once_until_it_is_a_hash_again(
    access: RawBroker, r: redis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A client's reads of the registry (every few seconds), with no worker to replace it."""
    caplog.set_level(logging.ERROR, logger="nbtask")
    registry = f"{prefix}:workers"
    r.set(registry, "not a hash")
    for _ in range(SWEEPS):
        assert access.keys.workers() == {}
    assert _said(caplog, "is not a hash") == 1  # (before: 5)
    r.delete(registry)
    r.hset(registry, uuid.uuid4().hex, b"{}")  # a hash again: the next planting is said
    assert access.keys.dead_workers()
    r.delete(registry)
    r.set(registry, "not a hash")
    for _ in range(SWEEPS):
        assert access.keys.workers() == {}
    assert _said(caplog, "is not a hash") == 2
