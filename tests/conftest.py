"""Fixtures: the real Redis and RabbitMQ, per-test key prefixes, worker processes.

Every test runs on the Redis broker. A module or test marked ``brokers`` runs once per
broker it names, both by default: ``redis`` and ``amqp`` (RabbitMQ through kombu, with the
real Redis as its result store); the ``settings`` fixture, and so ``app`` and
``start_worker``, follow. Helpers a test imports by name are in ``helpers.py`` and the
modules beside it (``worker_process.py``, ``private_redis.py``, ``raw_broker.py``...).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from helpers import (
    AMQP_URL,
    BROKERS,
    REDIS_URL,
    ROOT,
    SECRET,
    SESSION_PREFIX,
    amqp_reachable,
    delete_amqp_queues,
)
from private_redis import REDIS_SERVER, PrivateRedis
from raw_broker import RawBroker, raw_broker
from worker_process import WorkerProcess

from nbtask import App, Settings


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "brokers(*kinds): run once per broker (default: both)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("brokers")
    if marker is not None and "broker_kind" in metafunc.fixturenames:
        metafunc.parametrize("broker_kind", marker.args or BROKERS, indirect=True)


@pytest.fixture
def broker_kind(request: pytest.FixtureRequest) -> str:
    """``"redis"``, or the broker a ``brokers`` test runs on this time."""
    kind: str = getattr(request, "param", "redis")
    return kind


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The real Redis; a missing server fails the test with how to start it."""
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.ConnectionError as exc:
        pytest.fail(
            f"the Redis server at {REDIS_URL} is not reachable ({exc}). Start it with: "
            "redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no"
        )
    return REDIS_URL


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys (and only those) are deleted after."""
    name = f"{SESSION_PREFIX}-{uuid.uuid4().hex[:10]}"
    yield name
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{name}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A redis-server of the test's own (see ``PrivateRedis``), stopped after it."""
    if not os.access(REDIS_SERVER, os.X_OK):
        pytest.fail(f"{REDIS_SERVER} is missing: apt-get install -y redis-server")
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the real Redis (the store on both brokers), closed after the test."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def settings(
    broker_kind: str, redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    """Settings for the broker under test, with short heartbeats so failures show up fast.

    On AMQP the records live in the real Redis under the test's own prefix, and the
    queues the test declared are deleted after it.
    """
    common = Settings(
        secret=SECRET,
        key_prefix=prefix,
        heartbeat_interval=0.2,
        visibility_timeout=2.0,
        result_ttl=600.0,
    )
    if broker_kind == "redis":
        yield common.replace(broker_url=redis_url)
        return
    amqp_reachable()
    monkeypatch.setenv("NBTASK_RESULT_URL", redis_url)  # read by the worker processes
    yield common.replace(broker_url=AMQP_URL, result_url=redis_url)


@pytest.fixture(scope="session", autouse=True)
def _delete_the_sessions_amqp_queues() -> Iterator[None]:
    """The task queues this session's tests declared on RabbitMQ, deleted at its end."""
    yield
    delete_amqp_queues(SESSION_PREFIX)


@pytest.fixture
def access(settings: Settings) -> Iterator[RawBroker]:
    """The broker's queues and store, reached directly (as anyone with broker access can)."""
    raw = raw_broker(settings)
    yield raw
    raw.close()


@pytest.fixture
def app(settings: Settings) -> Iterator[App]:
    """A client app on the real Redis."""
    application = App("test", settings=settings)
    yield application
    application.close()


@pytest.fixture
def start_worker(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start real worker processes for this test's prefix; all stopped after the test."""
    started: list[WorkerProcess] = []

    def start(*extra: str, concurrency: int = 2, wait: bool = True) -> WorkerProcess:
        # The test's settings, except where it set a variable for its workers alone.
        env = {**settings.to_env(), **os.environ, "PYTHONPATH": str(ROOT)}
        log = tmp_path / f"worker-{len(started)}.log"
        command = [
            sys.executable,
            "-m",
            "nbtask",
            "worker",
            "-b",
            settings.broker_url or "",
            "--key-prefix",
            settings.key_prefix,
            "-c",
            str(concurrency),
            "-A",
            "tests.sample_tasks",
            *extra,
        ]
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT
            )
        worker = WorkerProcess(process, settings, log)
        started.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.end()
