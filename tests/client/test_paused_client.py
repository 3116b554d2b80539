"""A client that stops reading for a while still gets every outcome.

A client's channel keeps a bounded number of events (``CHANNEL_MAXLEN``): a notebook
whose process is stopped, or whose kernel holds the GIL in a long computation, while its
tasks end, finds the oldest events trimmed. The outcomes are still in the tasks' records.
The client here is a process of its own, stopped with SIGSTOP while its tasks run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from helpers import ROOT, WorkerProcess

from nbtask import Settings
from nbtask.brokers.redis_channels import CHANNEL_MAXLEN

pytestmark = [pytest.mark.brokers, pytest.mark.timeout(400)]

#: More tasks than the channel keeps events, each with one event (its end).
TASKS = CHANNEL_MAXLEN + 1_000

CLIENT = """
import concurrent.futures, sys
from nbtask import App

app = App("paused")
handles = [app.send_task("tests.sample_tasks.add", (i, 1)) for i in range({tasks})]
print("sent", flush=True)
sys.stdin.readline()  # the test stopped this process meanwhile, then let it go on
done, waiting = concurrent.futures.wait(handles, timeout=60)
right = sum(1 for i, h in enumerate(handles) if h in done and h.result() == i + 1)
print(f"ended {{len(done)}} right {{right}}", flush=True)
app.close()
"""


def _ended(r: redis.Redis, prefix: str) -> int:
    """How many tasks of ``prefix`` have ended (the store's ended-task set)."""
    return int(r.zcard(f"{prefix}:done"))


def test_a_client_stopped_while_more_tasks_ended_than_its_channel_keeps_gets_every_outcome(
    settings: Settings,
    start_worker: Callable[..., WorkerProcess],
    r: redis.Redis,
    tmp_path: Path,
) -> None:
    script = tmp_path / "client.py"
    script.write_text(CLIENT.format(tasks=TASKS))
    env = {**settings.to_env(), **os.environ, "PYTHONPATH": str(ROOT)}
    client = subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=ROOT,
        text=True,
    )
    try:
        assert client.stdout is not None and client.stdin is not None
        assert client.stdout.readline().strip() == "sent"
        client.send_signal(signal.SIGSTOP)  # no reading from here on
        start_worker()
        deadline = time.monotonic() + 240
        while _ended(r, settings.key_prefix) < TASKS:
            assert time.monotonic() < deadline, f"{_ended(r, settings.key_prefix)} ended"
            time.sleep(0.5)
        client.send_signal(signal.SIGCONT)
        client.stdin.write("go\n")
        client.stdin.flush()
        out, _ = client.communicate(timeout=120)
    finally:
        client.send_signal(signal.SIGCONT)
        if client.poll() is None:
            client.kill()
            client.wait()
    assert f"ended {TASKS} right {TASKS}" in out, out
