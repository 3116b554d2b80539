"""A broker that goes away and comes back: workers and clients carry on by themselves."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, wait_until
from private_redis import PrivateRedis

from nbtask import App, BrokerUnavailable, TaskHandle


def test_worker_and_client_survive_a_broker_restart(
    private_redis: PrivateRedis, tmp_path: Path
) -> None:
    env = dict(
        os.environ,
        NBTASK_SECRET="restart-secret",
        NBTASK_HEARTBEAT_INTERVAL="0.2",
        NBTASK_VISIBILITY_TIMEOUT="2",
        PYTHONPATH=str(ROOT),
    )
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "nbtask", "worker", "-b", private_redis.url, "-c", "1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    app = App("restart", broker=private_redis.url, secret="restart-secret")
    try:

        @app.task
        def add(x: int, y: int) -> int:
            return x + y

        assert add.delay(1, 2).get(timeout=20) == 3

        private_redis.stop()
        with pytest.raises(BrokerUnavailable):
            add.delay(5, 5)  # nothing to send to: one clear error, nothing half-sent
        private_redis.start()

        # The restarted server is empty (no persistence): the worker re-creates its queue,
        # the client's listener reconnects and reads the new events.
        deadline = time.monotonic() + 30
        result = None
        while result is None and time.monotonic() < deadline:
            try:
                result = add.delay(2, 3).get(timeout=5)
            except (BrokerUnavailable, TimeoutError):
                time.sleep(0.2)
        assert result == 5
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()
    finally:
        app.close()
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(10)
        except subprocess.TimeoutExpired:
            worker.kill()
        log.close()


def test_a_broker_outage_is_said_once_and_its_end_once(
    private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="nbtask")
    app = App("outage", broker=private_redis.url, secret="outage-secret")
    try:
        # A task no worker takes keeps the listener reading through the outage.
        waiting = app.send_task("tests.sample_tasks.add", (1, 1), queue="nobody-consumes")
        private_redis.stop()
        time.sleep(2.5)  # the listener's backoff retries several times meanwhile
        private_redis.start()
        wait_until(
            lambda: any("readable again" in r.getMessage() for r in caplog.records),
            20,
            "the listener to read again",
        )
        said = [r.getMessage() for r in caplog.records]
        assert len([m for m in said if "event channel unreachable" in m]) == 1, said
        assert len([m for m in said if "readable again" in m]) == 1, said
        assert not waiting.done()
    finally:
        app.close()


def test_a_send_that_fails_leaves_no_handle_registered(
    private_redis: PrivateRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = App("unsent", broker=private_redis.url, secret="unsent-secret")
    try:

        @app.task
        def add(x: int, y: int) -> int:
            return x + y

        kept = add.apply_async((1, 1), queue="nobody-consumes")
        listener = app._listener
        assert listener is not None
        registered: list[TaskHandle] = []
        register = listener.register

        def recording(handle: TaskHandle, *args: Any, **kwargs: Any) -> None:
            registered.append(handle)
            register(handle, *args, **kwargs)

        monkeypatch.setattr(listener, "register", recording)
        private_redis.stop()
        with pytest.raises(BrokerUnavailable):
            add.delay_many([(3, 3), (4, 4)])  # a batch waits for the broker's answer
        # The caller got no handle: the listener does not follow them either.
        assert len(registered) == 2
        assert [listener.get(h.id) for h in registered] == [None, None]
        assert listener.get(kept.id) is kept
    finally:
        app.close()
