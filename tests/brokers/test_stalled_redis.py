"""A Redis that stalls (stopped with SIGSTOP: it takes what is sent, says nothing back).

Unlike a Redis that is gone, a stalled one runs what it took once it wakes. So a command
whose answer did not come in time may still run: a publish is not sent again (it would
wait as long for nothing, then maybe run twice), and its handle says the task may run,
rather than that it will not. The client and a worker use the test's own redis-server.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from helpers import SECRET, PrivateRedis, ledger_runs, wait_until

from nbtask import App, BrokerUnavailable, Settings, errors

RECORD = "tests.sample_tasks.record_id"  # appends its id to a file: counts runs


@pytest.fixture
def settings(private_redis: PrivateRedis, prefix: str) -> Settings:
    """The test's client and workers on its own redis-server, which it may stop."""
    return Settings(
        secret=SECRET,
        key_prefix=prefix,
        broker_url=private_redis.url,
        heartbeat_interval=0.2,
        visibility_timeout=2.0,
        result_ttl=600.0,
    )


@pytest.fixture
def admin(private_redis: PrivateRedis) -> Iterator[redis.Redis]:
    """A client of the test's redis-server, for looking at it while it answers."""
    client = redis.Redis.from_url(private_redis.url)
    yield client
    client.close()


@contextlib.contextmanager
def stalled(server: PrivateRedis) -> Iterator[None]:
    """The server stopped (SIGSTOP) in the block, and running again after it."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


def test_a_send_a_stalled_redis_did_not_answer_for_is_said_to_be_in_doubt_and_may_run(
    app: App, private_redis: PrivateRedis, start_worker, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    app.send_task(RECORD, (str(ledger),))
    app.flush()  # connected, nothing owed
    with stalled(private_redis):
        h = app.send_task(RECORD, (str(ledger),))  # written; Redis reads it when it wakes
        # On this thread, which owes the reply. Not revoked: the task runs once Redis wakes.
        with pytest.raises(BrokerUnavailable) as info:
            h.get(timeout=30)
    raised = info.value
    assert isinstance(raised, errors.SendUnconfirmed), repr(raised)
    assert h.id in raised.task_ids and h.id in str(raised)
    assert "may still run" in str(raised) and "send it again" in str(raised)
    assert not h.done()  # still followed: its result comes when it runs
    start_worker(concurrency=1)
    assert h.get(timeout=30) == h.id
    wait_until(lambda: len(ledger_runs(ledger)) == 2, 30, "both tasks to run")
    assert ledger_runs(ledger)[h.id] == 1
