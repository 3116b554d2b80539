"""Tasks defined in a module, so workers resolve them by name (``-A tests.sample_tasks``)."""

from __future__ import annotations

import importlib
import os
import random
import sys
import time
from pathlib import Path

from nbtask import App

app = App("sample", insecure=True)


@app.task
def add(x: int, y: int) -> int:
    return x + y


class Patient(app.Task):
    """A task that says it started only once it has run for a minute (``started_after``)."""

    name = "tests.sample_tasks.patient"
    started_after = 60.0

    def run(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds


patient = app.register_task(Patient())


@app.task
def change_process_state(folder: str) -> None:
    """Leave this worker process in another folder, its generator reseeded."""
    os.chdir(folder)
    random.seed(1234)


@app.task
def recursion_limit() -> int:
    """This worker process's recursion limit, as a plain task finds it."""
    return sys.getrecursionlimit()


@app.task
def decimal_third() -> str:
    """One third in this worker process's decimal context, as a plain task finds it."""
    import decimal

    return str(decimal.Decimal(1) / 3)


@app.task(acks_late=True)
def slow_marker(path: str, seconds: float) -> int:
    """Append this process's pid to ``path``, sleep, and return the pid."""
    with Path(path).open("a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    return os.getpid()


@app.task
def slow_early(path: str, seconds: float) -> int:
    """Like slow_marker, but acknowledged early."""
    with Path(path).open("a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    return os.getpid()


@app.task
def chatty(n: int) -> int:
    """Print a few lines and report progress; return ``n``."""
    import nbtask

    for i in range(n):
        print(f"line {i}")
        nbtask.progress(i + 1, n, "counting")
    return n


@app.task
def prints_to_the_end(tag: int, lines: int) -> int:
    """Print ``lines`` lines about 0.4 ms apart (busy, not asleep); return ``tag``.

    The outbox's own thread is often sending some of them when the task ends and its
    last lines and final event go from the task's thread.
    """
    for i in range(lines):
        print(f"{tag}:{i}")
        until = time.perf_counter() + 0.0004
        while time.perf_counter() < until:
            pass
    return tag


@app.task
def explode(message: str) -> None:
    """Raise ValueError(message) from a helper, so the traceback has two user frames."""
    _explode_helper(message)


def _explode_helper(message: str) -> None:
    raise ValueError(message)


@app.task
def import_then_wait(folder: str, module: str, seconds: float) -> int:
    """Import ``module`` from ``folder``, then sleep ``seconds``; return this pid."""
    if folder not in sys.path:
        sys.path.insert(0, folder)
    importlib.import_module(module)
    time.sleep(seconds)
    return os.getpid()


@app.task
def wait_for_file(marker: str, go: str, timeout: float = 15.0) -> int:
    """Append this pid to ``marker``, print, then wait until ``go`` exists; return the pid."""
    with Path(marker).open("a") as f:
        f.write(f"{os.getpid()}\n")
    print("waiting for the go file")
    deadline = time.monotonic() + timeout
    while not Path(go).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{go} did not appear within {timeout} s")
        time.sleep(0.02)
    return os.getpid()


@app.task
def started_at() -> float:
    """Return the wall-clock time at which the task started running."""
    return time.time()


@app.task(acks_late=True)
def poison(path: str) -> None:
    """Record a start, then kill this worker process: a message no worker survives."""
    with Path(path).open("a") as f:
        f.write(f"{os.getpid()}\n")
    os.kill(os.getpid(), 9)


@app.task
def record_id(path: str, padding: str = "") -> str:
    """Append this task's id to ``path`` (to count executions) and return it.

    ``padding`` only makes the message as large as a test needs.
    """
    from nbtask import current_request

    request = current_request()
    assert request is not None
    with Path(path).open("a") as f:
        f.write(f"{request.id}\n")
    return request.id


@app.task
def mark_size(data: bytes, path: str) -> int:
    """Append the size of ``data`` to ``path`` (to count executions) and return it."""
    with Path(path).open("a") as f:
        f.write(f"{len(data)}\n")
    return len(data)


def load_noise() -> list[float]:
    """A named dataset's loader that draws it from the seeded global generator."""
    random.seed(1234)
    return [random.random() for _ in range(3)]


def load_squares() -> list[int]:
    """A named dataset's loader: notes each call in $NBTASK_TEST_LOADS (one line per call)."""
    ledger = os.environ.get("NBTASK_TEST_LOADS")
    if ledger:
        with open(ledger, "a") as f:
            f.write(f"{os.getpid()}\n")
    return [i * i for i in range(10)]


@app.task
def prints_and_warns(rows: int) -> int:
    """Print a row and a warning about it on stderr, ``rows`` times; then ``done``."""
    for i in range(rows):
        print("row", i, "ok")
        print(f"row {i}: value clipped", file=sys.stderr)
    print("done")
    return rows
