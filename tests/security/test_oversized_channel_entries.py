"""An outsider with write access to Redis (no secret) cannot make a client read much for it.

An entry larger than any event a client accepts, put in a client's event channel, is read
as empty (its bytes stay in Redis). The blocking read sent with the read of what waits
copies the first entry after each channel's position whatever its size: with a junk
backlog in front of it, on every read until the backlog was read. It now waits until the
backlog is read, so such an entry reaches the client at most once.

On a redis-server of the test's own, whose traffic is this client's alone.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
import redis
from private_redis import PrivateRedis

from nbtask import App

pytestmark = pytest.mark.brokers("redis")

_SECRET = "oversized-entries-secret"
_LARGEST = 256 << 10  # the largest event the client accepts (max_message_bytes)
_PLANTED = 2 << 20  # the planted entry: far more than that
_JUNK = 5_000  # junk entries before it: ten reads of 500


def _sent_bytes(raw: redis.Redis) -> int:
    """All the bytes the server has sent to its clients so far."""
    return int(raw.info("stats")["total_net_output_bytes"])


def test_an_oversized_entry_behind_a_junk_backlog_reaches_the_client_at_most_once(
    private_redis: PrivateRedis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="nbtask")
    raw = redis.Redis.from_url(private_redis.url)
    sender = App("sender", broker=private_redis.url, secret=_SECRET)
    app = App("reader", broker=private_redis.url, secret=_SECRET, max_message_bytes=_LARGEST)
    try:
        # A task another client sent, followed here by id: its channel is adopted, and
        # read after this client's own.
        task_id = uuid.uuid4().hex
        sender.send_task("tests.sample_tasks.add", (1, 2), task_id=task_id, queue="nobody")
        sender.flush()
        followed = app.handle(task_id)
        with pytest.raises(TimeoutError):
            followed.get(timeout=0.5)  # both channels read once: caught up
        other = sender.channel
        sender.close()

        junk = raw.pipeline(transaction=False)
        for n in range(_JUNK):
            junk.xadd(app.channel, {"e": b"junk %d" % n})
        junk.execute()
        raw.xadd(other, {"e": b"x" * _PLANTED})
        before = _sent_bytes(raw)
        with pytest.raises(TimeoutError):
            followed.get(timeout=3)  # the backlog and the planted entry read meanwhile
        sent = _sent_bytes(raw) - before
        assert any("more than any event a client accepts" in r.getMessage() for r in caplog.records)
        # Before: one copy at each of the ten reads of the backlog (over 20 MiB).
        assert sent < 2 * _PLANTED, f"{sent:,} bytes sent to read {_PLANTED:,} planted"
    finally:
        app.close()
        sender.close()
        raw.close()
