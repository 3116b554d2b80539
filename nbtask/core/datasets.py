"""Named datasets: data a worker loads once per process and hands to the tasks that need it.

A worker holds a dataset when it was started with ``--data NAME=module:function`` or
imports an app that declared one with ``@app.dataset("NAME")``. It then also consumes the
queue :func:`data_queue` names, so a task or cell that ``requires`` the dataset is routed
only to workers holding it. The loader runs the first time a task in a child process
needs it; the value is cached for that process's life and passed to the task as a
keyword argument (to a cell, as a variable) of the dataset's name, never shipped.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from nbtask.core.context import run_started
from nbtask.errors import ConfigurationError, NbtaskError

__all__ = [
    "DatasetCache",
    "DatasetError",
    "DatasetMissing",
    "Loader",
    "check_loader",
    "data_queue",
    "dataset_names",
    "dataset_of_queue",
    "load_data_spec",
]

log = logging.getLogger("nbtask.worker")

#: Makes a dataset's value; called with no arguments.
Loader = Callable[[], Any]
_QUEUE_PREFIX = "data."


class DatasetMissing(NbtaskError):
    """A task requires a dataset that the worker running it does not hold."""


class DatasetError(NbtaskError):
    """A dataset's loader failed (or made something no task can share) on the worker."""


def data_queue(name: str) -> str:
    """The queue the holders of dataset ``name`` consume."""
    return f"{_QUEUE_PREFIX}{name}"


def dataset_of_queue(queue: str) -> str | None:
    """The dataset whose holders consume ``queue`` (:func:`data_queue`), or ``None``."""
    return queue[len(_QUEUE_PREFIX) :] if queue.startswith(_QUEUE_PREFIX) else None


def dataset_names(value: object, what: str = "requires") -> tuple[str, ...]:
    """Dataset names from a name or a sequence of names; a clear error for anything else."""
    names = (value,) if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(
        isinstance(n, str) and n.isidentifier() for n in names
    ):
        raise ConfigurationError(
            f"{what} takes dataset names that are Python identifiers (a task receives each "
            f"as a keyword argument of that name), got {value!r}"
        )
    return tuple(names)


def load_data_spec(spec: str) -> tuple[str, Loader]:
    """``NAME=module:function`` (``nbtask worker --data``) -> the name and its loader."""
    name, _, target = spec.partition("=")
    module_name, _, attribute = target.partition(":")
    if not name.isidentifier() or not module_name or not attribute:
        raise ConfigurationError(
            f"--data {spec!r}: use NAME=module:function, NAME a Python identifier, e.g. "
            "--data iris=mylab.data:load_iris"
        )
    try:
        loader = getattr(importlib.import_module(module_name), attribute)
    except Exception as exc:  # the module may fail to import in any way
        raise ConfigurationError(
            f"--data {spec!r}: cannot find {target}: {type(exc).__name__}: {exc}"
        ) from None
    return name, check_loader(loader, f"--data {spec!r}: {target}")


def check_loader(loader: object, what: str) -> Loader:
    """``loader`` if it can make a dataset; else a clear error starting with ``what``.

    A generator function would hand every task the same generator, which the first one
    uses up: the next ones would silently get nothing.
    """
    if not callable(loader):
        raise ConfigurationError(f"{what} is not a function: give the function that loads it")
    if inspect.isgeneratorfunction(loader) or inspect.isasyncgenfunction(loader):
        raise ConfigurationError(
            f"{what} is a generator function (it yields): a loader returns the dataset, "
            "which every task of the process shares; return it instead of yielding it"
        )
    return loader


class DatasetCache:
    """The datasets one process holds, each loaded the first time a task needs it.

    Parameters
    ----------
    loaders
        ``{name: loader}``.
    """

    def __init__(self, loaders: Mapping[str, Loader]) -> None:
        self.loaders = dict(loaders)
        self._values: dict[str, Any] = {}
        self._lock = threading.Lock()
        #: Called after a dataset is loaded (the worker announces what it holds).
        self.on_load: Callable[[], None] | None = None

    def loaded(self) -> dict[str, Any]:
        """``{name: value}`` of the datasets loaded so far."""
        with self._lock:
            return dict(self._values)

    def values_for(self, names: Iterable[str]) -> dict[str, Any]:
        """``{name: value}`` for ``names``, loading those not loaded yet.

        Raises
        ------
        DatasetMissing
            This process holds no dataset of one of these names.
        """
        found = {}
        fresh = False
        for name in names:
            if name not in self.loaders:
                held = ", ".join(sorted(self.loaders)) or "none"
                raise DatasetMissing(
                    f"this worker holds no dataset {name!r} (it holds: {held}); start workers "
                    f"with --data {name}=module:function, or import an app that declares "
                    f'@app.dataset("{name}")'
                )
            with self._lock:
                if name not in self._values:
                    started = time.perf_counter()
                    self._values[name] = self._load(name)
                    log.info("loaded dataset %s in %.2f s", name, time.perf_counter() - started)
                    fresh = True
            found[name] = self._values[name]
        if fresh and self.on_load is not None:
            self.on_load()
        return found

    def _load(self, name: str) -> Any:
        """Run ``name``'s loader; its failure is a :class:`DatasetError` naming the dataset.

        Nothing is cached then: the next task that requires it tries again.
        """
        loader = self.loaders[name]
        where = f"{getattr(loader, '__module__', '?')}:{getattr(loader, '__qualname__', loader)}"
        run_started()  # it may change the process's state, as a task may
        try:
            value = loader()
            if inspect.iscoroutine(value):  # an ``async def`` loader: run it, as a task's
                value = asyncio.run(value)
        except Exception as exc:
            log.warning("could not load dataset %s (%s): %r", name, where, exc)
            error = DatasetError(
                f"dataset {name!r} could not be loaded on this worker: its loader {where} "
                f"raised {type(exc).__name__}: {exc}. Fix the loader or what it reads; the "
                "next task that requires it tries again"
            )
            # The loader's frames: the task's traceback shows its failing line.
            raise error.with_traceback(exc.__traceback__) from None
        if inspect.isgenerator(value) or inspect.isasyncgen(value):
            raise DatasetError(
                f"dataset {name!r}: its loader {where} returned a generator, which the first "
                "task would use up; return the data itself (a list, a DataFrame...)"
            )
        return value
