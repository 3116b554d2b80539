"""A worker of this host's name and kernel whose processes are in another pid namespace
(a container sharing the host's name, e.g. ``docker run --network host``; its pid 1
is a process here too). Killed whole, it is gone: its pid as it registered it names an
unrelated process of the client's namespace, which must not keep it said late for good."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROOT, wait_until

from nbtask import App, Settings
from nbtask.brokers import open_broker
from nbtask.client.live_workers import LATE_SECONDS, REFRESH_SECONDS

ADD = "tests.sample_tasks.add"
QUEUE = "in-another-namespace"


def _namespaced_worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    """A worker run as pid 1 of a pid namespace of its own (same host name, same kernel)."""
    env = {**settings.to_env(), **os.environ, "PYTHONPATH": str(ROOT)}
    command = [
        *["unshare", "--pid", "--fork", "--mount-proc"],
        *[sys.executable, "-m", "nbtask", "worker", "-b", settings.broker_url or ""],
        *["--key-prefix", settings.key_prefix, "-c", "1", "-A", "tests.sample_tasks"],
        *["-Q", QUEUE],
    ]
    with log.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "--pid", "--fork", "--mount-proc", "true"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


@pytest.fixture
def namespaced(settings: Settings, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    if not _can_unshare():
        pytest.skip("needs unshare --pid (root, or user namespaces)")
    process = _namespaced_worker(settings, tmp_path / "worker.log")
    yield process
    if process.poll() is None:
        # Its pid 1 first: killed, it takes the whole namespace with it (unshare alone
        # would leave the worker running).
        for pid in _children(process.pid):
            os.kill(pid, signal.SIGKILL)
        process.kill()
    process.wait(timeout=30)


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (the namespace's pid 1, as this namespace numbers it)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


def test_a_dead_worker_of_another_pid_namespace_is_not_late_for_good(
    app: App, namespaced: subprocess.Popen[bytes], start_worker
) -> None:
    """Killed whole, a worker that registered pid 1 (of its namespace) is said gone once
    its heartbeat lapsed and LATE_SECONDS passed: pid 1 of the client's namespace is
    another process, which started long before the worker. A worker of this namespace
    cleans up after it (it kept it "alive: its process 1 runs on this host")."""
    sweeper = start_worker(concurrency=1)

    def serving() -> str | None:
        return next((w for w, i in app.workers().items() if QUEUE in i.queues), None)

    wait_until(lambda: serving() is not None, 60, "the namespaced worker to register")
    worker_id = serving()
    assert app.workers()[worker_id].pid == 1  # (as its namespace numbers it)
    [init] = _children(namespaced.pid)
    os.kill(init, signal.SIGKILL)  # its pid 1: the whole namespace ends with it
    namespaced.wait(timeout=30)
    h = app.send_task(ADD, (1, 2), queue=QUEUE)
    app.flush()
    wait_until(lambda: worker_id not in app.workers(), 20, "its heartbeat to lapse")
    time.sleep(LATE_SECONDS + REFRESH_SECONDS + 1.0)
    wait_until(
        lambda: h.waiting_reason == f"no live worker consumes queue {QUEUE!r}",
        10,
        "the handle to say no live worker consumes its queue",
    )
    wait_until(lambda: worker_id not in _registered(app), 30, "its entry to be cleaned up")
    assert "cleaned up after dead worker" in sweeper.log.read_text()


def _registered(app: App) -> set[str]:
    """The ids of every worker in the registry, live or not."""
    broker = open_broker(app.settings, app.settings.broker_url or "")
    try:
        return {*broker.store.workers(), *broker.store.dead_workers()}
    finally:
        broker.close()
