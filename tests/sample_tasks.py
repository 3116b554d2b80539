"""Tasks defined in a module, so workers resolve them by name (``-A tests.sample_tasks``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from nbtask import App

app = App("sample", insecure=True)


@app.task
def add(x: int, y: int) -> int:
    return x + y


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
