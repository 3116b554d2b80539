"""Times the Lua scripts write or return are written in full, to the microsecond.

Lua's ``tostring`` keeps 14 significant digits: a Unix time lost its last two decimals
(up to 50 us). The store is Redis on both brokers.
"""

from __future__ import annotations

import uuid

import pytest
from raw_broker import RawBroker

from nbtask.brokers import StartBy

pytestmark = pytest.mark.brokers("redis")

DUE = 2_000_000_000.123457  # a due time tostring() wrote as 2000000000.1235


def test_the_next_due_time_of_an_eta_set_is_returned_in_full(access: RawBroker) -> None:
    access.store.zadd(access.keys.eta_key("default"), {b"t1:message": DUE})
    # The Redis Streams transport's move, and the store's claim (RabbitMQ's).
    assert access.streams.move_due(["default"]) == DUE
    nxt, claimed = access.keys.claim_due(["default"], lambda q: f"{q}-moving", 60.0)
    assert (nxt, claimed) == (DUE, [])


def test_a_tasks_start_time_keeps_redis_microseconds(access: RawBroker) -> None:
    """``started_at`` is Redis's TIME in full: before, always a multiple of 100 us."""
    by = StartBy("host", "1", "consumer")
    micros = []
    for _ in range(5):  # all five on a multiple of 100 us by chance: 1 in 10**10
        task_id = uuid.uuid4().hex
        seconds, before = access.store.time()
        assert access.keys.start(task_id, by) == "OK"
        after = access.store.time()
        started = float(access.record(task_id)[b"started_at"])
        assert seconds + before / 1e6 <= started <= after[0] + after[1] / 1e6
        micros.append(round(started * 1e6) % 100)
    assert any(micros), f"started_at rounded to 100 us: {micros}"
