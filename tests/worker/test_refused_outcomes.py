"""A Redis that answers but refuses writes for a while (full under ``noeviction``, a
read-only replica): a task that ended keeps its outcome, and the worker stores it once
Redis takes writes again, as after an outage. Never a false failure, never a task left
STARTED; and a message that the same round trip took is still run.

Real workers, on the test's own redis-server (its ``maxmemory`` and role are changed).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from helpers import AMQP_URL, SECRET, amqp_reachable, wait_until
from private_redis import PrivateRedis
from redis._parsers.base import BaseParser

from nbtask import App, Settings, TaskHandle
from nbtask.brokers.redis_upkeep import GROUP

WAIT = "tests.sample_tasks.wait_for_file"  # marks its start, waits for a go file, returns pid


@pytest.fixture
def settings(
    private_redis: PrivateRedis, prefix: str, monkeypatch: pytest.MonkeyPatch, request
) -> Settings:
    """The test's client and workers on its own redis-server (the store, on RabbitMQ)."""
    common = Settings(
        secret=SECRET,
        key_prefix=prefix,
        heartbeat_interval=0.2,
        visibility_timeout=2.0,
        result_ttl=600.0,
    )
    if getattr(request, "param", "redis") == "redis":
        return common.replace(broker_url=private_redis.url)
    amqp_reachable()
    monkeypatch.setenv("NBTASK_RESULT_URL", private_redis.url)  # read by the workers
    return common.replace(broker_url=AMQP_URL, result_url=private_redis.url)


@pytest.fixture
def admin(private_redis: PrivateRedis) -> Iterator[redis.Redis]:
    """A client of the test's redis-server, to fill it, or make it a replica."""
    client = redis.Redis.from_url(private_redis.url)
    yield client
    client.close()


def _start_two(app: App, tmp_path: Path, go: Path) -> list[TaskHandle]:
    """Two tasks, both running (one per child) once this returns, waiting for ``go``."""
    handles = [app.send_task(WAIT, (str(tmp_path / f"m{i}"), str(go), 120)) for i in range(2)]
    app.flush()
    # Their printed line reached the client: nothing of theirs but the outcome is unsent.
    wait_until(lambda: all("waiting" in h.stdout for h in handles), 30, "both to run")
    return handles


def _wait_said(log: Path, task_ids: list[str], what: str) -> None:
    """Until the worker's log says, for each task, that it could not store its outcome."""
    # (Earlier versions said it too, otherwise: they reported the task failed.)
    either = r"(cannot store the outcome of|could not settle) task "
    said = [re.compile(either + task_id) for task_id in task_ids]
    wait_until(lambda: all(s.search(log.read_text()) for s in said), 30, what)


def _no_false_failure(log: str) -> None:
    assert "reporting it failed" not in log, log
    assert "unexpected error while handling a message" not in log, log


def test_outcomes_a_full_redis_refuses_are_stored_once_it_has_room_and_the_next_are_run(
    app: App, admin: redis.Redis, start_worker, tmp_path: Path
) -> None:
    """Full: the last write of each task is refused, while the read sent with it takes
    the next message. The outcomes are stored later, and the messages taken are run."""
    worker = start_worker(concurrency=2)
    go = tmp_path / "go"
    first = _start_two(app, tmp_path, go)
    later = [app.send_task(WAIT, (str(tmp_path / f"n{i}"), str(go), 120)) for i in range(2)]
    app.flush()
    queue = app.transport.queue_key(app.settings.default_queue)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)  # every write is refused: out of memory
    try:
        go.touch()  # the first two end now
        # Each refused last write's read took one of the later messages.
        wait_until(lambda: admin.xpending(queue, GROUP)["pending"] == 4, 30, "the later ones taken")
        _wait_said(worker.log, [h.id for h in first], "the outcomes to be refused")
    finally:
        admin.config_set("maxmemory", 0)
    pids = [h.get(timeout=30) for h in first + later]
    assert all(isinstance(pid, int) for pid in pids), pids
    assert admin.xpending(queue, GROUP)["pending"] == 0
    log = worker.log.read_text()
    assert "refuses writes: it is full" in log and "raise its maxmemory" in log, log
    _no_false_failure(log)


@pytest.mark.parametrize("settings", ["redis", "amqp"], indirect=True)
def test_outcomes_a_read_only_redis_refuses_are_stored_once_it_is_a_primary_again(
    app: App, admin: redis.Redis, start_worker, tmp_path: Path, settings: Settings
) -> None:
    """A replica (REPLICAOF) refuses the last writes of running tasks; once a primary
    again (REPLICAOF NO ONE) the worker stores them, and takes new tasks. On RabbitMQ,
    the outcome goes to this Redis as the result store. The idle child's waiting read is
    ended (UNBLOCKED), and its reads refused, meanwhile: it waits as in an outage."""
    worker = start_worker(concurrency=3)
    go = tmp_path / "go"
    first = _start_two(app, tmp_path, go)
    # A replica of nothing that answers: it keeps its data, and takes no writes.
    nowhere = PrivateRedis(tmp_path).port  # (a free port)
    admin.execute_command("REPLICAOF", "127.0.0.1", str(nowhere))
    try:
        go.touch()  # the tasks end now
        _wait_said(worker.log, [h.id for h in first], "the outcomes to be refused")
    finally:
        admin.execute_command("REPLICAOF", "NO", "ONE")
    assert all(isinstance(h.get(timeout=30), int) for h in first)
    after = app.send_task(WAIT, (str(tmp_path / "after"), str(go), 120))
    assert isinstance(after.get(timeout=30), int)
    log = worker.log.read_text()
    assert "refuses writes: it is a read-only replica" in log, log
    assert "REPLICAOF NO ONE" in log, log
    _no_false_failure(log)


@pytest.mark.parametrize(
    ("text", "state"),
    [
        # Redis 7: the code leads, whether a command or a script met it.
        ("OOM command not allowed when used memory > 'maxmemory'.", "is full"),
        ("READONLY You can't write against a read only replica.", "is a read-only replica"),
        ("BUSY Redis is busy running a script. You can only call SCRIPT KILL", "is busy"),
        ("MISCONF Redis is configured to save RDB snapshots, but it's currently", "cannot save"),
        ("NOREPLICAS Not enough good replicas to write.", "has fewer good replicas"),
        ("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is", "lost its"),
        ("UNBLOCKED force unblock from blocking operation, instance state changed", "ended"),
        # Redis 6 wraps what a command in a script met.
        (
            "ERR Error running script (call to f_60b5): @user_script:1: @user_script: 1: "
            "-OOM command not allowed when used memory > 'maxmemory'.",
            "is full",
        ),
        (
            "ERR Error running script (call to f_60b5): @user_script:1: @user_script: 1: "
            "-READONLY You can't write against a read only replica.",
            "is a read-only replica",
        ),
        # Not refusals that pass.
        ("BUSYGROUP Consumer Group name already exists", None),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", None),
        ("ERR Error running script (call to f_60b5): @user_script:3: oops", None),
    ],
)
def test_which_error_replies_are_refusals_that_pass(text: str, state: str | None) -> None:
    """As redis-py reads them (a known code becomes its class, its code left out)."""
    from nbtask.brokers.redis_errors import refusal

    error = BaseParser.parse_error(text)
    found = refusal(error)
    if state is None:
        assert found is None, (text, found)
        return
    assert found is not None, text
    assert state in found[0], (text, found)
    assert "Error running script" not in found[1], found  # its own words only
