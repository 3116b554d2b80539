"""A digest of the code a task sent by name runs, to tell a worker whose copy differs.

A task of an importable module travels by name: the worker runs its own import of that
module. When the module was edited since the worker imported it (``%autoreload`` in the
notebook, a worker that was not restarted), the worker silently runs the old code, as a
Celery worker does. The sender puts a fingerprint of the task's code, as its process has
it loaded, in the signed header; the worker compares it with its own and says so when
they differ (:func:`code_differs`).

The fingerprint covers the bytecode, names and constants of the task's function (or its
class's methods, for a task class), not their line numbers: moving a function within its
file changes nothing. Bytecode differs between Python versions, so it is tagged with
Python's ``major.minor`` and compared only with a fingerprint of the same version.

:func:`module_fingerprint` is the same digest over the functions and classes' methods a
module defines: a notebook cell runs the worker's import of the local modules it uses.
"""

from __future__ import annotations

import sys
import threading
import types
import warnings
import weakref
from typing import Any

from blake3 import blake3

from nbtask.errors import CodeDiffersWarning

__all__ = [
    "code_differs",
    "code_fingerprint",
    "fingerprint_differs",
    "module_fingerprint",
    "warn_code_differs",
]

_TAG = f"py{sys.version_info[0]}.{sys.version_info[1]}:"

#: Per task: the functions fingerprinted with the code object each had, and the digest.
_Known = tuple[tuple[tuple[types.FunctionType, types.CodeType], ...], str]
_KNOWN: weakref.WeakKeyDictionary[object, _Known] = weakref.WeakKeyDictionary()
#: Per module: as for a task, and what its namespace held then (its size, the objects
#: digested by name): a reload rebinds its names to new objects.
_KnownModule = tuple[int, tuple[tuple[str, object], ...], _Known]
_KNOWN_MODULES: weakref.WeakKeyDictionary[types.ModuleType, _KnownModule] = (
    weakref.WeakKeyDictionary()
)


def code_fingerprint(task: object) -> str | None:
    """The fingerprint of a task's code as loaded in this process (cached per code object).

    ``None`` for a task with no code of its own (a stand-in of ``send_task``, nbtask's
    own tasks). ``%autoreload`` swaps a function's ``__code__`` in place: a changed code
    object makes a new fingerprint.
    """
    known = _KNOWN.get(task)
    if known is None or not _still(known):
        known = _KNOWN[task] = _digested(_functions_of(task))
    return known[1] or None


def module_fingerprint(module: types.ModuleType) -> str | None:
    """The fingerprint of the functions and classes' methods ``module`` defines, as loaded.

    Cached per module while its namespace holds the same objects with the same code:
    ``importlib.reload`` rebinds its names, ``%autoreload`` also swaps ``__code__`` in
    place. ``None`` for a module that defines no function.
    """
    namespace = vars(module)
    cached = _KNOWN_MODULES.get(module)
    if cached is not None:
        size, held, known = cached
        if (
            size == len(namespace)
            and _still(known)
            and all(namespace.get(name) is value for name, value in held)
        ):
            return known[1] or None
    # By name: a reload keeps the order its names were first bound in, a fresh import
    # the file's.
    named: list[tuple[str, object]] = []
    functions: list[types.FunctionType] = []
    for name, value in sorted(namespace.items()):
        if isinstance(value, type):
            if value.__module__ == module.__name__:
                named.append((name, value))
                functions.extend(f for f in _methods(value) if f not in functions)
        elif (function := _unwrapped(value)) and function.__module__ == module.__name__:
            named.append((name, value))
            if function not in functions:
                functions.append(function)
    known = _digested(functions)
    _KNOWN_MODULES[module] = (len(namespace), tuple(named), known)
    return known[1] or None


def _unwrapped(value: object) -> types.FunctionType | None:
    """The function ``value`` is, or wraps (``functools.wraps``, a task of ``@app.task``)."""
    for _ in range(8):  # a few decorators deep at most
        if isinstance(value, types.FunctionType) or not callable(value):
            break
        try:
            value = getattr(value, "__wrapped__", None)
        except Exception:  # an object whose attributes are computed: not a function
            return None
    return value if isinstance(value, types.FunctionType) else None


def fingerprint_differs(sent: str | None, mine: str | None) -> bool:
    """Whether the sender's fingerprint ``sent`` names other code than ``mine`` here.

    ``False`` when it cannot be told: no fingerprint sent (code shipped by value, an
    older sender), or one made by another Python version.
    """
    if not sent or not sent.startswith(_TAG):
        return False
    return sent != mine


def code_differs(sent: str | None, task: object) -> bool:
    """Whether the sender's fingerprint ``sent`` names other code than ``task`` has here.

    See :func:`fingerprint_differs`.
    """
    return fingerprint_differs(sent, code_fingerprint(task)) if sent else False


def _still(known: _Known) -> bool:
    """Whether the functions digested still have the code they had then."""
    return all(f.__code__ is code for f, code in known[0])


def _digested(functions: list[types.FunctionType]) -> _Known:
    digest = blake3()
    for function in functions:
        digest.update(_code_text(function.__code__).encode())
    fingerprint = _TAG + digest.hexdigest()[:32] if functions else ""
    return tuple((f, f.__code__) for f in functions), fingerprint


_WARNED: set[tuple[str, str, str]] = set()  # (task name, worker, pid) warned of here
_WARNED_LOCK = threading.Lock()


def warn_code_differs(name: str, worker: object, pid: object) -> None:
    """Warn, once per task name and worker process, that it ran its own, other code."""
    key = (name, str(worker), str(pid))
    with _WARNED_LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    warnings.warn(
        f"worker {worker} (process {pid}) ran its own copy of task {name!r}, which differs "
        "from this process's (was its module edited since the worker imported it?): the "
        "result is the worker's code's. Restart the workers to run the edit (the embedded "
        "cluster: %reload_ext nbtask, or a new App)",
        CodeDiffersWarning,
        stacklevel=2,
    )


def _functions_of(task: object) -> list[types.FunctionType]:
    """The task's function, and the methods of its classes that are not nbtask's own."""
    found: list[types.FunctionType] = []
    wrapped = getattr(type(task), "__wrapped__", None)
    if isinstance(wrapped, types.FunctionType):
        found.append(wrapped)
    for cls in type(task).__mro__:
        if cls is object or cls.__module__.split(".")[0] == "nbtask":
            continue
        found.extend(f for f in _methods(cls) if f not in found)
    return found


def _methods(cls: type) -> list[types.FunctionType]:
    """The functions a class defines itself, by name."""
    return [f for _, value in sorted(vars(cls).items()) if (f := _function(value)) is not None]


def _function(value: Any) -> types.FunctionType | None:
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    elif isinstance(value, property):
        value = value.fget
    return value if isinstance(value, types.FunctionType) else None


def _code_text(code: types.CodeType) -> str:
    """What a code object does, as text: bytecode, names, constants (nested code too)."""
    consts = ",".join(_const_text(c) for c in code.co_consts)
    return f"{code.co_name}|{code.co_code.hex()}|{code.co_names}|{code.co_varnames}|{consts}"


def _const_text(value: Any) -> str:
    if isinstance(value, types.CodeType):
        return "<" + _code_text(value) + ">"
    if isinstance(value, frozenset):  # its order depends on the process's hash seed
        return "frozenset(" + ",".join(sorted(_const_text(v) for v in value)) + ")"
    if isinstance(value, tuple):
        return "(" + ",".join(_const_text(v) for v in value) + ")"
    return repr(value)
