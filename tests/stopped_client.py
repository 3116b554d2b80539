"""A client run as a process of its own, stopped (SIGSTOP) while its tasks send to it.

A stopped process reads nothing: what its tasks send meanwhile waits in its channel, as for
a notebook whose process is stopped, or whose kernel holds the GIL in a long computation.
The script the client runs reads one line from stdin where the test stops it:
``resume()`` continues the process and sends that line, and the script goes on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import redis
from helpers import ROOT
from worker_process import WorkerProcess

from nbtask import Settings

__all__ = ["StoppedClient", "stopped_client", "stopped_while_tasks_end"]


class StoppedClient:
    """A client script's process: its stdout read line by line, stopped and continued."""

    def __init__(self, script: Path, settings: Settings, *args: str) -> None:
        env = {**settings.to_env(), **os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(
            [sys.executable, str(script), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=ROOT,
            text=True,
        )

    def readline(self) -> str:
        """The next line the script printed, stripped."""
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def stop(self) -> None:
        """SIGSTOP: no reading from here on."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self, timeout: float = 120) -> tuple[str, str]:
        """Continue the process and let its script go on; what it wrote (stdout, stderr).

        A script that ended meanwhile is not written to: what it wrote says why it ended.
        """
        self.process.send_signal(signal.SIGCONT)
        return self.process.communicate("go\n", timeout=timeout)

    def end(self) -> None:
        """Continue the process if it is stopped, and kill it if it still runs."""
        self.process.send_signal(signal.SIGCONT)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def stopped_client(
    source: str, settings: Settings, tmp_path: Path, *args: str
) -> Iterator[StoppedClient]:
    """Run the client script ``source`` (with ``args``); ended when the block is left."""
    script = tmp_path / "client.py"
    script.write_text(source)
    client = StoppedClient(script, settings, *args)
    try:
        yield client
    finally:
        client.end()


def _ended_tasks(r: redis.Redis, prefix: str) -> int:
    """How many tasks of ``prefix`` have ended (the store's ended-task set)."""
    return int(r.zcard(f"{prefix}:done"))


def stopped_while_tasks_end(
    source: str,
    settings: Settings,
    start_worker: Callable[..., WorkerProcess],
    r: redis.Redis,
    tmp_path: Path,
    *,
    tasks: int,
    timeout: float,
    before_resume: Callable[[], None] | None = None,
) -> tuple[str, str]:
    """What the client script ``source`` wrote (stdout, stderr), stopped while its tasks ran.

    The script sends its tasks and prints ``sent``; it is stopped, a worker starts, and it
    goes on once ``tasks`` tasks have ended. However long a loaded machine takes to run
    them: it fails once ``timeout`` seconds went by with no task ending. ``before_resume``
    is called then, the client still stopped.
    """
    with stopped_client(source, settings, tmp_path) as client:
        assert client.readline() == "sent"
        client.stop()
        start_worker()
        deadline, before = time.monotonic() + timeout, 0
        while (ended := _ended_tasks(r, settings.key_prefix)) < tasks:
            if ended > before:
                deadline, before = time.monotonic() + timeout, ended
            assert time.monotonic() < deadline, f"{ended} of {tasks} tasks ended"
            time.sleep(0.2)
        if before_resume is not None:
            before_resume()
        # The client has every outcome to take in: however long a loaded machine takes
        # (its script gives up once a minute brought none).
        return client.resume(timeout=300)
