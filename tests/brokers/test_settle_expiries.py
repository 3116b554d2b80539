"""Settling task after task pushes the shared keys' expiry back once a second, not per task.

Each settle stores a record (its expiry set anew) and appends to its client's channel; a
final one also adds the task to the ended-task set. A process settling many tasks pushes
back the expiry of the set and of each channel once a second (two commands less per
task), and neither key is ever left without an expiry: a channel the append makes anew
gets one at once, and the workers' housekeeping gives the set one if it has none.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from private_redis import PrivateRedis

from nbtask import App, State
from nbtask.brokers import redis_store
from nbtask.brokers.handoffs import Settlement
from nbtask.wire.events import FINAL_SEQ, Event, EventType
from nbtask.wire.records import final_fields

pytestmark = pytest.mark.brokers

SHORT = 1000  # an expiry well below result_ttl, to see whether a settle pushed it back


class _StoppedClock:
    """The store's ``time`` module, its monotonic clock stopped: settles come at once."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _StoppedClock:
    stopped = _StoppedClock()
    monkeypatch.setattr(redis_store, "time", stopped)
    return stopped


def _settle(app: App, task_id: str) -> str:
    """Store ``task_id`` as SUCCESS and tell ``app`` (as its worker does)."""
    run = (app.settings.key_prefix, time.time())
    raw = app.signer.seal(Event(EventType.SUCCESS, task_id, FINAL_SEQ, {}, run=run).to_header())
    fields = final_fields(State.SUCCESS, raw, time.time())
    return app.store.settle(Settlement(task_id, app.channel, raw, fields))


def _keys(app: App) -> tuple[str, str]:
    """The ended-task set and ``app``'s channel."""
    return f"{app.settings.key_prefix}:done", app.channel


def test_settles_in_a_row_push_the_expiries_back_once_a_second(
    private_app: Callable[[str], App], private_redis: PrivateRedis, clock: _StoppedClock
) -> None:
    app = private_app("expiries")
    r = redis.Redis.from_url(private_redis.url)
    assert _settle(app, "t0") == ""
    for key in _keys(app):
        assert r.ttl(key) > SHORT
        r.expire(key, SHORT)
    assert _settle(app, "t1") == ""
    # Within the second: written, not pushed back (the record's own expiry is set).
    for key in _keys(app):
        assert 0 < r.ttl(key) <= SHORT
    assert r.ttl(f"{app.settings.key_prefix}:r:t1") > SHORT
    assert r.zscore(_keys(app)[0], "t1") is not None
    clock.now += 1.5
    assert _settle(app, "t2") == ""
    for key in _keys(app):
        assert r.ttl(key) > SHORT
    r.close()


def test_a_channel_a_settle_makes_anew_expires(
    private_app: Callable[[str], App], private_redis: PrivateRedis, clock: _StoppedClock
) -> None:
    app = private_app("anew")
    r = redis.Redis.from_url(private_redis.url)
    assert _settle(app, "t0") == ""
    channel = _keys(app)[1]
    r.delete(channel)  # it expired, or someone deleted it
    assert _settle(app, "t1") == ""
    assert r.xlen(channel) == 1 and r.ttl(channel) > SHORT
    r.close()


def test_housekeeping_gives_an_ended_task_set_without_an_expiry_one(
    private_app: Callable[[str], App], private_redis: PrivateRedis
) -> None:
    app = private_app("sweep")
    r = redis.Redis.from_url(private_redis.url)
    assert _settle(app, "t0") == ""
    done = _keys(app)[0]
    r.persist(done)  # as a settle within the second leaves a set someone deleted and it made
    app.store.forget_ended_before(3600.0)
    assert r.zscore(done, "t0") is not None and r.ttl(done) > SHORT
    # One with an expiry keeps it: the set goes that long after its last write.
    r.expire(done, SHORT)
    app.store.forget_ended_before(3600.0)
    assert 0 < r.ttl(done) <= SHORT
    r.close()
