"""A worker that starts on a key prefix that live workers of another broker serve (a Redis
broker and RabbitMQ, their store on one Redis) says so in one log line naming them and the
fix, and starts: the registry that tells is unsigned. Workers of one broker say nothing."""

from __future__ import annotations

import pytest
from helpers import AMQP_URL

from nbtask import App
from nbtask.wire.records import WorkerInfo
from nbtask.worker.mixed_brokers import say_if_brokers_mixed

_SAID = "is served by live workers of another broker"


@pytest.mark.brokers
def test_a_worker_starting_where_live_workers_of_another_broker_serve_its_prefix_says_so(
    app: App,
    broker_kind: str,
    redis_url: str,
    start_worker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = start_worker(concurrency=1)
    same = start_worker(concurrency=1)  # the same broker: nothing to say
    other_kind = "amqp" if broker_kind == "redis" else "redis"
    # The store of either is the Redis the first ones use (a Redis broker ignores this).
    monkeypatch.setenv("NBTASK_RESULT_URL", redis_url)
    other = start_worker("-b", AMQP_URL if other_kind == "amqp" else redis_url, concurrency=1)
    said = [line for line in other.log.read_text().splitlines() if _SAID in line]
    assert len(said) == 1, other.log.read_text()
    first_id, same_id = (
        next(w for w, info in app.workers().items() if info.pid == worker.pid)
        for worker in (first, same)
    )
    line = said[0]
    assert f"{first_id} ({broker_kind})" in line and f"{same_id} ({broker_kind})" in line
    assert f"while this one serves {other_kind}" in line
    assert "give each broker's workers and clients their own key prefix" in line
    assert "--key-prefix, NBTASK_KEY_PREFIX" in line
    for quiet in (first, same):
        assert _SAID not in quiet.log.read_text()
    # It serves: the line is a warning, not a refusal.
    assert {info.broker for info in app.workers().values()} == {broker_kind, other_kind}


def _info(broker: str) -> WorkerInfo:
    return WorkerInfo("host", 1, ("default",), 1, ("c",), broker=broker)


def test_the_line_leaves_out_older_entries_and_shows_planted_text_harmlessly() -> None:
    live = {"me": _info("redis"), "old": _info(""), "twin": _info("redis")}
    assert say_if_brokers_mixed("redis", "p", live, "me") is None
    # Entries are unsigned: control characters are not written to the log, nor long text.
    live |= {f"w{n}": _info("amqp") for n in range(4)} | {"\x1b[2J" + "x" * 500: _info("\x07")}
    line = say_if_brokers_mixed("redis", "p", live, "me")
    assert line is not None and line.isprintable() and len(line) < 600
    assert "?[2Jxxx" in line and "w0 (amqp), w1 (amqp) and 2 more" in line
    assert "old" not in line and "twin" not in line
