"""The notebook's own modules a cell uses, and telling a worker whose copy of one differs.

A module written next to the notebook (``helpers.py``, not an installed package) is edited
as the notebook goes, and reloaded in the kernel (``%autoreload``, ``importlib.reload``).
A worker process that imported it for an earlier cell keeps its old copy, which a later
cell importing it, or reading a function of it sent by name, then runs. So a cell carries
a fingerprint of each such module it uses, as the kernel has it loaded
(:func:`cell_modules`, by :func:`nbtask.core.fingerprint.module_fingerprint`); before the
cell runs, the worker compares each one it has imported already with its own copy, and
says so on the cell's stderr, once per module and process, when one differs
(:func:`say_which_differ`). The cell still runs, on the worker's copy. A module the worker
has not imported yet is imported fresh by the cell: nothing to say.
"""

from __future__ import annotations

import functools
import os
import sys
import weakref
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import Any

from nbtask.core.fingerprint import fingerprint_differs, module_fingerprint

__all__ = [
    "cell_modules",
    "is_local",
    "is_local_file",
    "module_name_of",
    "say_which_differ",
    "ships_by_value",
]

_LOCAL: weakref.WeakKeyDictionary[ModuleType, bool] = weakref.WeakKeyDictionary()
_TOLD: set[str] = set()  # the modules said to differ in this worker process


def module_name_of(value: Any) -> str:
    """The name of the module ``value`` comes from (a module's own name)."""
    if isinstance(value, ModuleType):
        return value.__name__
    return str(getattr(value, "__module__", None) or type(value).__module__ or "")


def is_local(module: ModuleType) -> bool:
    """Whether ``module`` is the user's own code, not Python's nor an installed package's.

    A file outside Python's folders and any ``site-packages``; where a module sits does
    not change, so it is found once per module.
    """
    local = _LOCAL.get(module)
    if local is None:
        local = _LOCAL[module] = _outside_installed(module)
    return local


def ships_by_value(module: ModuleType) -> bool:
    """Whether a cell ships values of ``module`` with its code (pickled by value).

    Those of the local modules under the notebook's folder, which workers on other
    machines could not import: such values carry the kernel's code itself.
    """
    if not is_local(module):
        return False
    path = os.path.abspath(str(module.__file__))
    return path.startswith(os.path.abspath(os.getcwd()) + os.sep)


def cell_modules(imports: Iterable[str], values: Iterable[Any]) -> tuple[tuple[str, str], ...]:
    """``(name, fingerprint)`` of each local module a cell uses, as loaded here.

    Those it imports (a package with its submodules loaded here), and those whose values
    it ships by reference: one shipped by value carries this kernel's code. A module this
    kernel has not imported has no fingerprint here.
    """
    imported = set(imports)
    tops = dict.fromkeys(imported)
    for value in values:
        tops.setdefault(module_name_of(value).partition(".")[0])
    found: list[tuple[str, str]] = []
    for top in tops:
        if top in sys.stdlib_module_names:
            continue
        module = sys.modules.get(top)
        if module is None or not is_local(module):
            continue
        if top not in imported and ships_by_value(module):
            continue
        for each in _loaded_under(module):
            fingerprint = module_fingerprint(each)
            if fingerprint is not None:
                found.append((each.__name__, fingerprint))
    return tuple(found)


def say_which_differ(modules: Iterable[tuple[str, str]]) -> None:
    """Say on stderr which of the notebook's ``modules`` this process has another copy of.

    ``modules`` are :func:`cell_modules` as the notebook sent them. Once per module and
    process; one not imported here yet is imported fresh by the cell, the same.
    """
    for name, theirs in modules:
        module = sys.modules.get(name)
        if module is None or name in _TOLD:
            continue
        if fingerprint_differs(theirs, module_fingerprint(module)):
            _TOLD.add(name)
            print(
                f"nbtask: this worker's {name} differs from the notebook's (edited since the "
                "worker imported it?), and the cell runs the worker's: restart the workers "
                "(%reload_ext nbtask for the embedded cluster)",
                file=sys.stderr,
            )


def _loaded_under(package: ModuleType) -> Iterator[ModuleType]:
    """``package`` and its submodules imported here (each bound in its parent)."""
    seen: set[str] = set()
    stack = [package]
    while stack:
        module = stack.pop()
        if module.__name__ in seen:
            continue
        seen.add(module.__name__)
        yield module
        if hasattr(module, "__path__"):  # a package: its submodules are its attributes
            inside = module.__name__ + "."
            stack.extend(
                v
                for v in list(vars(module).values())
                if isinstance(v, ModuleType) and v.__name__.startswith(inside)
            )


def _outside_installed(module: ModuleType) -> bool:
    return is_local_file(module.__name__, getattr(module, "__file__", None))


def is_local_file(name: str, path: str | None) -> bool:
    """Whether module ``name``, loaded from ``path``, is the user's own (:func:`is_local`)."""
    if not path or name in ("__main__", "nbtask") or name in sys.builtin_module_names:
        return False
    return _local_path(path if os.path.isabs(path) else os.path.abspath(path))


@functools.lru_cache(maxsize=1024)
def _local_path(path: str) -> bool:
    """Whether absolute ``path`` lies outside the installed packages.

    Remembered: every cell asks again of the same few files (on a worker, for each function
    in its namespace), and the answer depends on the path alone.
    """
    path = os.path.abspath(path)  # normalized
    installed = {os.path.abspath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    if any(path.startswith(p + os.sep) for p in installed):
        return False
    return "site-packages" not in path and "dist-packages" not in path
