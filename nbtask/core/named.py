"""Tasks of importable modules, pickled by name: each process uses its own import.

``@app.task`` makes a class per task, which no module holds under its name, so a plain
pickle would carry the class, its function and the globals that function reads by value.
A task a module holds under its name (not ``__main__``, not a module shipped by value)
is pickled as a reference instead, as Celery does: wherever it is loaded (a chain's later
step, a ``link``, a task in a cell's variables), that process imports the module and uses
the task it holds, the very instance ``delay`` runs there, with that module's state.
Tasks defined in a notebook or inside a function still travel by value.

A class-based task registered as Celery's guide does, ``app.register_task(AddTask())``,
is found by name too: where the module holds its class under the class's name, the
instance is the one of that class, with that name, that the module holds under another
name or registered on an app the module holds (see :func:`held_instance`).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Mapping
from types import FunctionType, ModuleType
from typing import Any

import cloudpickle

__all__ = ["held_instance", "importable", "module_tasks", "reduced_by_name", "task_named"]

#: The class options a message is built from (see :mod:`nbtask.core.outgoing`): carried
#: with a reference, for a process that cannot import the task's module to send it.
_CARRIED = (
    "acks_late",
    "ignore_result",
    "time_limit",
    "soft_time_limit",
    "reject_on_worker_lost",
    "serializer",
    "store_result",
    "requires",
    "queue",
    "expires",
)

#: Exact types whose values have no ``tasks`` (no instance dict, none on the class), and
#: ``from __future__ import ...`` flags: skipped without getattr_static, which costs
#: microseconds a global, for every send of a class-based task (the cell task among them).
_HOLD_NO_TASKS = frozenset(
    {str, bytes, int, float, bool, complex, type(None), tuple, list, dict, set, frozenset}
    | {type(annotations)}  # the flag ``from __future__ import annotations`` binds
)
#: A module's globals the import system sets (its loader, its spec): never an app.
_IMPORT_SYSTEM_NAMES = frozenset({"__loader__", "__spec__"})


def importable(task: object) -> bool:
    """Whether ``task`` is what its module holds under its class's name, so is found by name.

    Never one of ``__main__`` (a notebook, a script): the workers do not have it.
    """
    cls = type(task)
    module = sys.modules.get(cls.__module__)
    if module is None or cls.__module__ == "__main__":
        return False
    target: Any = module
    for part in cls.__qualname__.split("."):
        target = getattr(target, part, None)
    if target is cls:  # a class-based task: its instance is held otherwise
        target = held_instance(module, cls, getattr(task, "name", ""))
    return target is task


def module_tasks(module: ModuleType) -> list[object]:
    """What ``module`` holds that may be a task, with what its apps registered.

    Its globals, and the tasks registered on apps among them whose class the module
    defines (``app.register_task(AddTask())``, held by no name). Callers keep the tasks
    among them (``isinstance(value, Task)``).
    """
    held = list(vars(module).items())
    values = [value for _, value in held]
    for name, value in held:
        kind = type(value)
        if kind in _HOLD_NO_TASKS or isinstance(value, type) or name in _IMPORT_SYSTEM_NAMES:
            continue
        if kind is FunctionType or kind is ModuleType:  # what getattr_static finds on them
            tasks = value.__dict__.get("tasks")
        else:  # looked up statically: a proxy (current_app) or a lazy object is not woken
            tasks = inspect.getattr_static(value, "tasks", None)
        if isinstance(tasks, Mapping):
            values += [t for t in tasks.values() if type(t).__module__ == module.__name__]
    return values


def held_instance(module: ModuleType, cls: type, name: str) -> object | None:
    """The instance of ``cls`` named ``name`` that ``module`` holds, else ``None``.

    Under a name of its own (``add = app.register_task(AddTask())``), or registered on an
    app the module holds (``app.register_task(AddTask())``): in the module's globals, or
    in the ``tasks`` of one of them.
    """
    for value in module_tasks(module):
        if type(value) is cls and getattr(value, "name", None) == name:
            return value
    return None


def reduced_by_name(task: object, base: type) -> tuple[Any, ...] | None:
    """How to pickle ``task`` as a reference (see :func:`task_named`), else ``None``.

    Not for a task of a module cloudpickle ships by value (one beside the notebook, which
    a cell carries with its code): the task goes with it. A stand-in :func:`task_named`
    made keeps its reference; ``base`` is the class such a stand-in derives from.
    """
    reference = type(task).__dict__.get("_by_name")
    if isinstance(reference, tuple):
        return task_named, reference
    cls = type(task)
    if not importable(task) or _shipped_by_value(cls.__module__):
        return None
    carried = {name: getattr(task, name) for name in _CARRIED}
    return task_named, (cls.__module__, cls.__qualname__, getattr(task, "name", ""), base, carried)


def _shipped_by_value(module: str) -> bool:
    """Whether cloudpickle ships ``module`` by value (one beside the notebook, for a cell)."""
    return bool(cloudpickle.cloudpickle._is_registered_pickle_by_value(sys.modules[module]))


def task_named(
    module: str, qualname: str, name: str, base: type, carried: Mapping[str, Any]
) -> Any:
    """The task ``module`` holds as ``qualname`` in this process, imported if need be.

    Where the module cannot be imported (a worker that does not have it, which sends a
    chain's next step on to another queue), a stand-in that sends the task by name, its
    message naming ``module`` for the worker that runs it; as ``send_task`` does.
    """
    try:
        imported = importlib.import_module(module)
        target: Any = imported
        for part in qualname.split("."):
            target = getattr(target, part)
        if isinstance(target, type):  # a class-based task: the instance the module holds
            target = held_instance(imported, target, name)
    except Exception:
        target = None
    if isinstance(target, base) and getattr(target, "name", None) == name:
        return target
    attrs = {
        **carried,
        "name": name,
        "abstract": False,
        "__module__": "",  # sent by name: never shipped by value (see code_for)
        "_sent_module": module,
        "_by_name": (module, qualname, name, base, dict(carried)),
    }
    return type("RemoteTask", (base,), attrs)()
