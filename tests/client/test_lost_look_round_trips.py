"""The look for tasks an outage lost reads its handles' records in one round trip.

A client with many unfinished tasks reads all their records after every outage: one
round trip each made that look as slow as its handles were many. On a redis-server of the
test's own, which counts the reads it served.
"""

from __future__ import annotations

import pytest
import redis
from private_redis import PrivateRedis

from nbtask import App
from nbtask.client.lost import LostTasks

pytestmark = pytest.mark.brokers("redis")

_TASKS = 200


def _reads(raw: redis.Redis) -> int:
    """How many times the server has read from its clients' connections so far."""
    return int(raw.info("stats")["total_reads_processed"])


def test_the_look_for_lost_tasks_reads_their_records_together(
    private_redis: PrivateRedis,
) -> None:
    raw = redis.Redis.from_url(private_redis.url)
    app = App("many", broker=private_redis.url, secret="lost-look-secret")
    try:
        handles = [
            app.send_task("tests.sample_tasks.add", (n, 1), queue="nobody") for n in range(_TASKS)
        ]
        app.flush()
        # The outage took the records (their messages still wait: none is lost).
        raw.delete(*(app.store.record_key(h.id) for h in handles))
        lost = LostTasks(
            app.store,
            app.settings.key_prefix,
            lambda _: None,
            app.transport.sends_in_doubt,
            app.transport.still_queued,
            app.settings.result_ttl,
            ends_missing=True,
        )
        lost.outage_ended()
        before = _reads(raw)
        lost.look(handles)
        reads = _reads(raw) - before
        assert len(lost._missing) == _TASKS  # each record read, and found missing
        assert reads < _TASKS // 4, f"{reads} reads to look at {_TASKS} records"
    finally:
        app.close()
        raw.close()
