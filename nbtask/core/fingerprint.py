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

__all__ = ["code_differs", "code_fingerprint", "warn_code_differs"]

_TAG = f"py{sys.version_info[0]}.{sys.version_info[1]}:"

#: Per task: the functions fingerprinted with the code object each had, and the digest.
_Known = tuple[tuple[tuple[types.FunctionType, types.CodeType], ...], str]
_KNOWN: weakref.WeakKeyDictionary[object, _Known] = weakref.WeakKeyDictionary()


def code_fingerprint(task: object) -> str | None:
    """The fingerprint of a task's code as loaded in this process (cached per code object).

    ``None`` for a task with no code of its own (a stand-in of ``send_task``, nbtask's
    own tasks). ``%autoreload`` swaps a function's ``__code__`` in place: a changed code
    object makes a new fingerprint.
    """
    known = _KNOWN.get(task)
    if known is not None and all(f.__code__ is code for f, code in known[0]):
        return known[1] or None
    functions = _functions_of(task)
    digest = blake3()
    for function in functions:
        digest.update(_code_text(function.__code__).encode())
    fingerprint = _TAG + digest.hexdigest()[:32] if functions else ""
    _KNOWN[task] = (tuple((f, f.__code__) for f in functions), fingerprint)
    return fingerprint or None


def code_differs(sent: str | None, task: object) -> bool:
    """Whether the sender's fingerprint ``sent`` names other code than ``task`` has here.

    ``False`` when it cannot be told: no fingerprint sent (a task shipped by value, an
    older sender), or one made by another Python version.
    """
    if not sent or not sent.startswith(_TAG):
        return False
    return sent != code_fingerprint(task)


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
        for _, value in sorted(vars(cls).items()):
            function = _function(value)
            if function is not None and function not in found:
                found.append(function)
    return found


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
