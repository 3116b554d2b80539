"""A Redis without persistence restarts: the handles of tasks it lost end, no others do."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable

import pytest
import redis
from helpers import wait_until
from private_redis import PrivateRedis

from nbtask import App, TaskHandle, TaskNotFound


def _restart(server: PrivateRedis, caplog: pytest.LogCaptureFixture) -> None:
    """Stop the server (it saves nothing) and start it again, empty; wait for the client."""
    caplog.clear()
    server.stop()
    server.start()
    _wait_for_the_client(caplog)


def _wait_for_the_client(caplog: pytest.LogCaptureFixture) -> None:
    """Until the client's listener says, since ``caplog`` was cleared, it reads again."""
    wait_until(
        lambda: any("readable again" in r.getMessage() for r in caplog.records),
        30,
        "the listener to read again",
    )


def test_tasks_queued_when_redis_restarts_empty_end_as_lost(
    private_redis: PrivateRedis,
    caplog: pytest.LogCaptureFixture,
    private_worker: Callable[..., subprocess.Popen[bytes]],
    private_app: Callable[[str], App],
) -> None:
    caplog.set_level(logging.WARNING, logger="nbtask")
    private_worker()
    app = private_app("lost")

    @app.task
    def slow(seconds: float) -> str:
        time.sleep(seconds)
        return "slept"

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(acks_late=True)
    def late_add(x: int, y: int) -> int:
        return x + y

    # Runs through the restart (and the few seconds a missing record is looked at
    # twice): started, so never taken for lost.
    running = slow.delay(12)
    wait_until(lambda: running.state == "STARTED", 30, "the slow task to start")
    queued = [add.delay(1, 2), late_add.delay(3, 4)]
    chained = (add.s(1, 1) | add.s(10) | add.s(100)).delay()
    steps = [chained.parent, chained]
    assert steps[0] is not None and steps[0].parent is not None
    head = steps[0].parent
    app.flush()  # every send answered for: their records are written

    _restart(private_redis, caplog)

    assert running.get(timeout=60) == "slept"
    for handle in [*queued, head]:
        with pytest.raises(TaskNotFound, match="lost by the broker") as lost:
            handle.get(timeout=60)
        said = str(lost.value)
        assert handle.id in said and "AOF" in said and "send it again" in said, said
        assert handle.state == "FAILURE"
    for step in steps:
        assert step is not None
        with pytest.raises(TaskNotFound, match="an earlier task in the chain") as lost:
            step.get(timeout=30)
        assert head.id in str(lost.value)
    # Sent after the restart: runs as usual.
    assert add.delay(2, 3).get(timeout=30) == 5


def test_a_send_not_answered_for_across_a_restart_is_not_taken_for_lost(
    private_redis: PrivateRedis,
    caplog: pytest.LogCaptureFixture,
    private_worker: Callable[..., subprocess.Popen[bytes]],
    private_app: Callable[[str], App],
) -> None:
    caplog.set_level(logging.WARNING, logger="nbtask")
    app = private_app("owed")

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    earlier = add.delay(0, 0)
    app.flush()  # connected, the workers read: the next delay() sends at once
    # A lone delay() does not wait for Redis's reply: this one is written to a Redis
    # that takes it and never runs it. Its thread sends it again with its next command.
    private_redis.pause()
    handle: TaskHandle = add.delay(1, 2)
    private_redis.kill()
    caplog.clear()
    private_redis.start()
    _wait_for_the_client(caplog)
    # No record, but its send is in doubt: left waiting through several looks.
    time.sleep(12)
    assert not handle.done(), handle.error
    assert not any(handle.id in r.getMessage() for r in caplog.records)
    # The one queued before the pause was answered for: lost with the restart.
    with pytest.raises(TaskNotFound, match="lost by the broker"):
        earlier.get(timeout=0)

    app.flush()  # the reply never comes: the publish is sent again
    private_worker()
    assert handle.get(timeout=60) == 3


def test_a_send_answered_before_the_restart_but_read_after_it_ends_as_lost(
    private_redis: PrivateRedis,
    caplog: pytest.LogCaptureFixture,
    private_app: Callable[[str], App],
) -> None:
    caplog.set_level(logging.WARNING, logger="nbtask")
    app = private_app("owed")
    raw = redis.Redis.from_url(private_redis.url)
    try:

        @app.task
        def add(x: int, y: int) -> int:
            return x + y

        # Redis queues it and replies; the reply waits unread in this thread's connection.
        handle: TaskHandle = add.delay(1, 2)
        key = app.store.record_key(handle.id)  # (a name only: no command)
        wait_until(lambda: bool(raw.exists(key)), 10, "Redis to run the publish")
        raw.close()

        _restart(private_redis, caplog)
        time.sleep(8)
        assert not handle.done(), handle.error  # in doubt until its reply is read

        app.flush()  # reads that Redis queued it: nothing is sent again, nothing queued
        with pytest.raises(TaskNotFound, match="lost by the broker"):
            handle.get(timeout=60)
    finally:
        raw.close()


def test_a_later_chain_step_queued_when_redis_restarts_empty_ends_as_lost_not_one_unsent(
    private_redis: PrivateRedis,
    caplog: pytest.LogCaptureFixture,
    private_worker: Callable[..., subprocess.Popen[bytes]],
    private_app: Callable[[str], App],
) -> None:
    caplog.set_level(logging.WARNING, logger="nbtask")
    private_worker()
    app = private_app("lost-step")

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    @app.task
    def slow_number(x: int, seconds: float) -> int:
        time.sleep(seconds)
        return x

    # Its first step succeeds; the worker then sends the second to a queue no worker
    # serves, where it waits through the restart (as a step waits behind others).
    queued = (add.s(1, 1) | add.s(10).set(queue="nobody-serves") | add.s(100)).delay()
    middle = queued.parent
    assert middle is not None and middle.parent is not None
    assert middle.parent.get(timeout=30) == 2
    wait_until(lambda: app.store.get_record(middle.id) is not None, 10, "the step's send")
    # Its first step runs through the restart: the step after it, not sent yet, is
    # never taken for lost, and runs once its first step succeeds.
    unsent = (slow_number.s(6, 12) | add.s(1)).delay()
    assert unsent.parent is not None
    wait_until(lambda: unsent.parent.state == "STARTED", 30, "the slow step to start")
    app.flush()

    _restart(private_redis, caplog)

    with pytest.raises(TaskNotFound, match="lost by the broker") as lost:
        middle.get(timeout=60)
    assert middle.id in str(lost.value) and "send it again" in str(lost.value)
    with pytest.raises(TaskNotFound, match="an earlier task in the chain") as lost:
        queued.get(timeout=30)
    assert middle.id in str(lost.value)
    assert unsent.get(timeout=60) == 7
