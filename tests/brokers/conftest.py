"""Fixtures of the broker tests: the test's broker behind a proxy, and a client using it.

The :class:`~tcp_proxy.TcpProxy` stands in front of the broker the test runs on (Redis,
or RabbitMQ), so that a test can lose what the client sends or what the broker answers
(``hold()``, ``deafen()``, ``cut()``, ``refuse()``). On RabbitMQ the client reaches its
store (the real Redis) directly; workers reach both directly.

A RabbitMQ test of the transport itself has ``transport`` (a client's, or a worker's:
an :class:`~nbtask.brokers.amqp.AmqpTransport` with its store), ``worker_transport``
(another one, with connections of its own) and ``proxied_transport`` (one reaching
RabbitMQ through ``proxy``).

A test on a redis-server of its own (``private_redis``) has its apps, worker processes
and client processes made by ``private_app``, ``private_worker`` and ``private_processes``:
one secret, short heartbeats, all closed or stopped after the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import ROOT
from private_redis import PrivateRedis
from tcp_proxy import TcpProxy, proxying, via

from nbtask import App, Settings
from nbtask.brokers.amqp import AmqpTransport
from nbtask.brokers.redis_link import RedisLink
from nbtask.brokers.redis_store import RedisStore


@pytest.fixture
def proxy(settings: Settings) -> Iterator[TcpProxy]:
    """A proxy in front of the test's broker, for the test's client."""
    url = settings.broker_url or ""
    with proxying(url, 5672 if url.startswith("amqp") else 6379) as opened:
        yield opened


def _amqp_transport(settings: Settings, url: str | None = None) -> AmqpTransport:
    store = RedisStore(RedisLink(settings.result_url or "", "result store"), settings)
    return AmqpTransport(url or settings.broker_url or "", store)


@pytest.fixture
def transport(settings: Settings) -> Iterator[AmqpTransport]:
    """An AMQP transport on the test's settings (RabbitMQ tests), closed after the test."""
    opened = _amqp_transport(settings)
    yield opened
    opened.close()


@pytest.fixture
def worker_transport(settings: Settings) -> Iterator[AmqpTransport]:
    """Another AMQP transport, as a worker's: connections of its own."""
    opened = _amqp_transport(settings)
    yield opened
    opened.close()


@pytest.fixture
def proxied_transport(settings: Settings, proxy: TcpProxy) -> Iterator[AmqpTransport]:
    """An AMQP transport reaching RabbitMQ through ``proxy`` (its store directly)."""
    opened = _amqp_transport(settings, via(settings.broker_url or "", proxy.url_port))
    yield opened
    opened.close()


@pytest.fixture
def client(settings: Settings, proxy: TcpProxy) -> Iterator[App]:
    """A client app whose broker connections go through ``proxy``."""
    url = via(settings.broker_url or "", proxy.url_port)
    application = App("proxied", settings=settings.replace(broker_url=url))
    yield application
    application.close()


_PRIVATE_SECRET = "private-redis-secret"


@pytest.fixture
def private_env() -> dict[str, str]:
    """The environment of a process on ``private_redis``: its secret, short heartbeats."""
    return dict(
        os.environ,
        NBTASK_SECRET=_PRIVATE_SECRET,
        NBTASK_HEARTBEAT_INTERVAL="0.2",
        NBTASK_VISIBILITY_TIMEOUT="2",
        PYTHONPATH=str(ROOT),
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a worker (two SIGTERMs at most, then SIGKILL) or a client."""
    for _ in range(2):
        if process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
            return
        except subprocess.TimeoutExpired:
            pass
    process.kill()
    process.wait(5)


@pytest.fixture
def private_processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Worker and client processes a test starts, stopped after it."""
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)  # a client left stopped
        _stop(process)


@pytest.fixture
def private_worker(
    private_redis: PrivateRedis,
    private_env: dict[str, str],
    private_processes: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> Callable[..., subprocess.Popen[bytes]]:
    """Start a worker process on ``private_redis`` (one task at a time), reading ``queues``.

    Its default queue when none is named; the tasks of ``tasks_module`` (``-A``) registered
    when one is given; its log in ``worker.log``; stopped after the test.
    """

    def start(*queues: str, tasks_module: str | None = None) -> subprocess.Popen[bytes]:
        chosen = ["-Q", ",".join(queues)] if queues else []
        chosen += ["-A", tasks_module] if tasks_module else []
        command = ["-m", "nbtask", "worker", "-b", private_redis.url, "-c", "1", *chosen]
        with (tmp_path / "worker.log").open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, *command], env=private_env, stdout=out, stderr=subprocess.STDOUT
            )
        private_processes.append(process)
        return process

    return start


@pytest.fixture
def private_app(private_redis: PrivateRedis) -> Iterator[Callable[[str], App]]:
    """Make client apps named as given on ``private_redis``; all closed after the test."""
    made: list[App] = []

    def make(name: str) -> App:
        made.append(App(name, broker=private_redis.url, secret=_PRIVATE_SECRET))
        return made[-1]

    yield make
    for application in made:
        application.close()
