"""The modules the values of a cell come from, and which of them are the user's own.

A module written beside the notebook (``helpers.py``, not an installed package) is the
user's own code: a worker on another machine cannot import it.
"""

from __future__ import annotations

import os
import sys
import weakref
from types import ModuleType
from typing import Any

__all__ = ["is_local", "module_name_of", "ships_by_value"]

_LOCAL: weakref.WeakKeyDictionary[ModuleType, bool] = weakref.WeakKeyDictionary()


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


def _outside_installed(module: ModuleType) -> bool:
    path = getattr(module, "__file__", None)
    if (
        not path
        or module.__name__ in ("__main__", "nbtask")
        or module.__name__ in sys.builtin_module_names
    ):
        return False
    path = os.path.abspath(path)
    installed = {os.path.abspath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    if any(path.startswith(p + os.sep) for p in installed):
        return False
    return "site-packages" not in path and "dist-packages" not in path
