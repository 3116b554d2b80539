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


class RegisteredSite(app.Task):
    """A class-based task registered as Celery's guide does: ``app.register_task(...)``.

    No module name holds the instance (only the class's name is the module's), yet it
    travels by name: it reads the module's lock, which no pickle can carry.
    """

    def run(self, previous: object = None) -> tuple[str, bool]:
        """The module's ``SITE``, and whether this is the instance the module registered."""
        with _LOCK:
            return SITE, self is app.tasks[self.name]


class HeldSite(RegisteredSite):
    """The same, its registered instance held under another name than its class's."""

    name = "tests.named_tasks.HeldSite"


app.register_task(RegisteredSite())
held_site = app.register_task(HeldSite())
