"""Finding the task a message names, in a worker process.

Tasks shipped by value are loaded once per process (keyed by code digest), so a custom
task class keeps one instance per worker process; tasks sent by name come from the
worker's registry (``-A``) or are imported by module, with an error naming what is known.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from nbtask.core.named import module_tasks
from nbtask.core.task import Task
from nbtask.errors import NotRegistered
from nbtask.wire.envelope import Buffer
from nbtask.wire.message import TaskMessage, decode_value

__all__ = ["TaskFinder"]


class TaskFinder:
    """The tasks a worker process knows, and how it finds one for a message.

    Parameters
    ----------
    tasks
        Registered tasks (``-A module``), by name.
    hostname
        Named in errors.
    """

    def __init__(self, tasks: Mapping[str, Task], hostname: str) -> None:
        self._by_name = dict(tasks)
        self._shipped: dict[str, Task] = {}
        self._hostname = hostname

    def find(self, message: TaskMessage, code: Buffer) -> Task:
        """The task a verified message names: shipped by value, registered, or imported."""
        if message.code is not None:
            task = self._shipped.get(message.code)
            if task is None:
                # One instance per process for shipped tasks too, keyed by code digest.
                task = decode_value(code, "cloudpickle")
                self._shipped[message.code] = task
            return task
        task = self._by_name.get(message.name)
        if task is None:
            task = self._import(message)
        return task

    def _import(self, message: TaskMessage) -> Task:
        if not message.module:
            raise NotRegistered(self._unknown(message, "it was sent by name only"))
        try:
            module = importlib.import_module(message.module)
        except ImportError as exc:
            why = f"importing {message.module!r} failed: {exc}"
            raise NotRegistered(self._unknown(message, why)) from None
        for value in module_tasks(module):  # with app.register_task(AddTask()) instances
            if isinstance(value, Task) and not type(value).is_abstract():
                self._by_name.setdefault(value.name, value)
        task = self._by_name.get(message.name)
        if task is None:
            why = f"module {message.module!r} defines no such task"
            raise NotRegistered(self._unknown(message, why))
        return task

    def _unknown(self, message: TaskMessage, why: str) -> str:
        known = ", ".join(sorted(self._by_name)) or "none"
        return (
            f"task {message.name!r} is not registered on worker {self._hostname} ({why}). "
            f"Registered tasks: {known}. Start the worker with -A for the module that defines "
            "it, and import it under the same path on both sides ('proj.tasks' and 'tasks' "
            "are different names)"
        )
