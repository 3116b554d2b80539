"""Helpers shared by the tests: the services' addresses, waiting, worker processes.

Fixtures live in ``conftest.py``; everything a test imports by name lives here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from nbtask import Settings
from nbtask.brokers import open_broker

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("NBTASK_TEST_REDIS", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("NBTASK_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
BROKERS = ("redis", "amqp")
SECRET = "test-secret-" + uuid.uuid4().hex


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def client_env(settings: Settings) -> dict[str, str]:
    """The environment of a client process with these settings and no others."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBTASK_")}
    return {**env, **settings.to_env(), "PYTHONPATH": str(ROOT)}


def amqp_reachable() -> None:
    """Fail, saying how to start it, unless RabbitMQ answers at AMQP_URL."""
    import kombu

    conn = kombu.Connection(AMQP_URL, connect_timeout=3)
    try:
        conn.ensure_connection(max_retries=1, timeout=3)
    except Exception as exc:
        pytest.fail(
            f"RabbitMQ at {AMQP_URL} is not reachable ({exc}). Start it with: "
            "rabbitmq-server -detached (then wait a few seconds for port 5672)"
        )
    finally:
        conn.release()


def delete_amqp_queues(prefix: str) -> None:
    """Delete the durable task queues a test declared (``<prefix>:q:*``)."""
    import kombu

    out = subprocess.run(
        ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name"],
        capture_output=True, text=True, timeout=30, check=False,
    ).stdout  # fmt: skip
    names = [n for n in out.split() if n.startswith(f"{prefix}:q:")] or [f"{prefix}:q:default"]
    with kombu.Connection(AMQP_URL, connect_timeout=3) as conn:
        channel = conn.channel()
        for name in names:
            channel.queue_delete(name)


class WorkerProcess:
    """A ``python -m nbtask worker`` subprocess."""

    def __init__(self, process: subprocess.Popen[bytes], settings: Settings, log: Path) -> None:
        self.process = process
        self.settings = settings
        self.log = log

    @property
    def pid(self) -> int:
        return self.process.pid

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.pid).children()

    def wait_ready(self, timeout: float = 20.0) -> None:
        broker = open_broker(self.settings, self.settings.broker_url or "")
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(f"worker exited early:\n{self.log.read_text()}")
                live = [i for i in broker.store.workers().values() if i.pid == self.pid]
                if live and len(self.children()) >= 1:
                    return
                time.sleep(0.05)
        finally:
            broker.close()
        raise AssertionError(f"worker not ready after {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
