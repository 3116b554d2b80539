"""Module-level tasks whose module state is the worker's own (``-A tests.named_tasks``).

A test sets other values in its own import of this module (``SITE``, ``COUNTER``): a task
that runs the worker's import returns the worker's. ``_LOCK`` cannot be pickled, as a
module's database client or connection pool cannot: its tasks must travel by name.
"""

from __future__ import annotations

import os
import threading

from nbtask import App

app = App("named-tasks", insecure=True)

#: What the worker's import holds; a test changes its own.
SITE = "imported"
COUNTER = {"n": 0}
_LOCK = threading.Lock()


@app.task
def site(previous: object = None) -> str:
    """The module's ``SITE``, as the process running the task has it."""
    return SITE


@app.task
def bump(previous: object = None) -> int:
    """Count one more call in the module's ``COUNTER`` of the process running the task."""
    COUNTER["n"] += 1
    return COUNTER["n"]


@app.task
def locked(*args: object) -> list[object]:
    """Its arguments, read under the module's lock (which no pickle can carry)."""
    with _LOCK:
        return list(args)


class CountingTask(app.Task):
    """Counts calls on the task instance: one instance per worker process keeps counting."""

    calls = 0


@app.task(base=CountingTask, bind=True)
def count_calls(self: CountingTask, previous: object = None) -> tuple[int, int, int]:
    """``(process id, instance id, calls on this instance so far)``."""
    self.calls += 1
    return os.getpid(), id(self), self.calls
