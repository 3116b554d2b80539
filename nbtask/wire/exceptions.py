"""A task's exception, pickled so that it loads again whatever its ``__init__`` takes.

Pickle rebuilds an exception by calling its class with ``exc.args``. An exception whose
``__init__`` takes other arguments than it passes on (``MyError(code, detail)`` calling
``super().__init__(f"{code}: {detail}")``) then fails to load in the client, which could
only raise a ``RemoteError`` instead of the task's own type. Rebuilt here without calling
``__init__``, as ``copy.copy`` would, it keeps its type, ``args`` and attributes.
"""

from __future__ import annotations

from typing import Any

from nbtask.wire.envelope import dumps

__all__ = ["portable_exception", "rebuild_exception"]

_DEFAULT_REDUCERS = {
    name: getattr(BaseException, name) for name in ("__reduce__", "__reduce_ex__", "__setstate__")
}


def rebuild_exception(
    kind: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]
) -> BaseException:
    """An exception of ``kind`` with ``args`` and attributes ``state``, ``__init__`` not run."""
    exc = kind.__new__(kind, *args)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class _Portable:
    """Pickles as :func:`rebuild_exception` of its exception: loads as the exception."""

    def __init__(self, kind: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]):
        self.reduced = (rebuild_exception, (kind, args, state))

    def __reduce__(self) -> tuple[Any, ...]:
        return self.reduced


def portable_exception(exc: BaseException, *, picklable_only: bool = False) -> object:
    """What to pickle for ``exc``: itself if its class pickles itself, else a stand-in.

    With ``picklable_only`` the stand-in leaves out the attributes that cannot be
    pickled (a lock, an open connection), which mean nothing in another process, so
    the rest still travels.
    """
    kind = type(exc)
    if any(getattr(kind, name) is not method for name, method in _DEFAULT_REDUCERS.items()):
        return exc  # the class says how it pickles (OSError, nbtask's own errors)
    state = dict(getattr(exc, "__dict__", {}))
    if picklable_only:
        state = {name: value for name, value in state.items() if _pickles(value)}
    return _Portable(kind, tuple(exc.args), state)


def _pickles(value: object) -> bool:
    """Whether ``value`` pickles as nbtask pickles it (``functools`` caches by value)."""
    try:
        dumps(value)
    except Exception:  # whatever a value's own __reduce__ raises
        return False
    return True
