"""Values a cell shares with the notebook: those that come back, and what functions carry.

:func:`load_values` unpickles what a cell sent back; :func:`share_namespace` lets a
notebook function shipped with a cell see the notebook's names as it does locally;
:func:`carried_names` lists the values such a function reads, which travel (and may come
back changed) with it.
"""

from __future__ import annotations

import dataclasses
import pickle
import types
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any

from nbtask.core.refs import ValueRef
from nbtask.wire.blobs import Packed

__all__ = [
    "WithObjects",
    "carried_names",
    "changeable",
    "load_each",
    "load_values",
    "may_change",
    "read_globals",
    "share_namespace",
    "share_value",
]


def load_values(result: Mapping[str, Any], objects: Mapping[str, Any]) -> dict[str, Any]:
    """Unpickle the values a cell sent back (on the kernel's main thread).

    ``objects``: the notebook's objects the cell was sent, by shipped name, which the
    values hold where the worker named them (``pair = (small, 1)``: ``pair[0] is small``).
    The blob is part of a result whose envelope was verified by the listener.
    """
    blob = result.get("values")
    values: dict[str, Any] = blob.load(_finder(objects)) if isinstance(blob, Packed) else {}
    return values


def load_each(
    result: Mapping[str, Any], objects: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Exception]]:
    """:func:`load_values` a value at a time: those that load, and why each other did not.

    For values that do not load together: one that cannot be loaded here loses no other.
    """
    blob = result.get("values")
    return blob.load_items(_finder(objects)) if isinstance(blob, Packed) else ({}, {})


@dataclasses.dataclass(frozen=True)
class WithObjects:
    """A value a cell sent back, loaded with the notebook's objects it names (its ``Out``)."""

    packed: Packed
    objects: Mapping[str, Any]

    def load(self) -> Any:
        """The value, holding the notebook's own objects where it names them."""
        return self.packed.load(_finder(self.objects))


def _finder(objects: Mapping[str, Any]) -> Callable[[Any], Any]:
    """An unpickler's ``persistent_load``: the notebook object a shipped name stands for.

    Or a kept value's reference, where the worker named a kept value by it
    (:func:`~nbtask.notebook.cell_values.pack`).
    """

    def find(name: Any) -> Any:
        if isinstance(name, ValueRef):  # a kept value the values hold: its reference
            return name
        try:
            return objects[name]
        except (KeyError, TypeError):
            raise pickle.UnpicklingError(
                f"the value names the notebook's object {name!r}, which is no longer known here"
            ) from None

    return find


def share_namespace(
    namespace: MutableMapping[str, Any], names: Iterable[str] | None = None
) -> list[str]:
    """Let functions and classes defined in the notebook see ``namespace`` as their globals.

    A function pickled by value arrives with a private copy of the globals it named; in the
    notebook it reads the namespace itself, so a name defined in a later cell is found.
    The top-level functions, and the methods of top-level classes, are made to read
    ``namespace`` again; the globals they carried are added to it where it has no such
    name (they are the notebook's values, pickled with them). Returns the names added.

    ``names``: only those that just arrived (a kernel's namespace holds every earlier
    cell's, rebound when they came); default every name.
    """
    carried: dict[str, Any] = {}
    chosen = list(namespace) if names is None else [n for n in names if n in namespace]
    for name in chosen:
        namespace[name] = _shared(namespace[name], namespace, carried)
    return _add_carried(namespace, carried)


def share_value(namespace: MutableMapping[str, Any], value: Any) -> Any:
    """``value``, which came back unnamed (a cell's last expression), made to read ``namespace``.

    As :func:`share_namespace` does for names; an object of a class defined in the
    notebook too (its methods: a ``_repr_html_`` that looks names up in the notebook).
    """
    carried: dict[str, Any] = {}
    value = _shared(value, namespace, carried)
    _shared(type(value), namespace, carried)
    _add_carried(namespace, carried)
    return value


def _shared(value: Any, namespace: Any, carried: dict[str, Any]) -> Any:
    """``value`` reading ``namespace`` if it is a function or class of the notebook."""
    if _from_notebook(value, namespace):
        carried.update(value.__globals__)
        return _rebound(value, namespace)
    if isinstance(value, type) and value.__module__ == "__main__":
        for attribute, member in list(vars(value).items()):
            if _from_notebook(member, namespace):
                carried.update(member.__globals__)
                setattr(value, attribute, _rebound(member, namespace))
    return value


def _add_carried(namespace: MutableMapping[str, Any], carried: Mapping[str, Any]) -> list[str]:
    """Add the globals functions carried where ``namespace`` has no such name; their names."""
    added = [n for n in carried if n not in namespace and not n.startswith("__")]
    for name in added:
        namespace[name] = carried[name]
    return added


def carried_names(values: Mapping[str, Any], namespace: Mapping[str, Any]) -> list[str]:
    """The notebook's values the shipped functions in ``values`` carry, by name.

    A function of the notebook travels with the globals it names, and with those of the
    notebook's functions it names in turn (``results`` of ``def record(x):
    results.append(x)``); the worker adds them to the cell's namespace
    (:func:`share_namespace`). A cell can change them in place through the functions,
    without naming them: they may come back. Only values that can change in place are
    named (no modules, functions, classes, numbers or strings).
    """
    found = []
    for name in read_globals(values, namespace):
        value = namespace.get(name, _MISSING)
        if name in values or value is _MISSING:
            continue
        if may_change(value) and not isinstance(value, types.FunctionType):
            found.append(name)
    return found


def read_globals(values: Mapping[str, Any], namespace: Mapping[str, Any]) -> list[str]:
    """The global names the notebook's functions in ``values`` may read when called.

    Those their code names, and those of the notebook's functions they name in turn,
    found through ``namespace``; defined there or not (a name the function reads may be
    one a cell still running will bind).
    """
    found: dict[str, None] = {}
    functions = [f for v in values.values() for f in _notebook_functions(v)]
    seen: set[int] = set()
    while functions:
        function = functions.pop()
        if id(function) in seen:
            continue
        seen.add(id(function))
        for name in _global_names(function.__code__):
            found.setdefault(name)
            value = namespace.get(name, _MISSING)
            if value is not _MISSING and name not in values:
                functions.extend(_notebook_functions(value))
    return list(found)


_MISSING = object()


def _notebook_functions(value: Any) -> list[types.FunctionType]:
    """``value`` if it is a function of the notebook; the methods of a notebook class."""
    if isinstance(value, type) and value.__module__ == "__main__":
        return [m for m in vars(value).values() if _of_main(m)]
    return [value] if _of_main(value) else []


def _of_main(value: Any) -> bool:
    return isinstance(value, types.FunctionType) and value.__module__ == "__main__"


def _global_names(code: types.CodeType) -> set[str]:
    """The names ``code`` and the code nested in it may read as globals."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            names |= _global_names(constant)
    return names


def may_change(value: Any) -> bool:
    """Whether a cell may change ``value`` in place (a function: its attributes)."""
    return not isinstance(
        value,
        (types.ModuleType, type, int, float, str, bytes, bool, type(None), frozenset),
    )


def changeable(value: Any) -> bool:
    """Whether ``value`` is an object a cell could change in place, not a shared constant.

    Numbers, strings, ``None`` and tuples are left out: the same small int or empty tuple
    is bound to unrelated names, so their identity says nothing.
    """
    return may_change(value) and not isinstance(value, (tuple, complex, range, slice))


def _from_notebook(value: Any, namespace: Mapping[str, Any]) -> bool:
    return (
        isinstance(value, types.FunctionType)
        and value.__module__ == "__main__"
        and value.__globals__ is not namespace
    )


def _rebound(function: types.FunctionType, namespace: Any) -> types.FunctionType:
    copy = types.FunctionType(
        function.__code__,
        namespace,
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__dict__.update(function.__dict__)
    copy.__qualname__ = function.__qualname__
    copy.__annotations__ = function.__annotations__
    copy.__doc__ = function.__doc__
    copy.__module__ = function.__module__
    return copy
