"""The notebook's named objects a cell reaches inside the values it reads.

Locally ``d["a"].append(3)`` changes the list the notebook also names ``l``, and
``pipe.fit(X, y)`` fits the ``scaler`` it also names: one object, reached two ways.
:func:`named_inside` finds such objects in the values a cell is sent, so that they travel
as shipped names of their own (in the same pickle: on the worker ``d["a"] is l`` still);
one the cell changes then comes back as any shipped value changed in place does, written
into the notebook's object (:mod:`nbtask.notebook.inplace`).

The look is cheap and bounded, made before every cell: the items of lists, tuples, sets,
deques and dicts and the attributes of objects, a few levels down, up to a thousand
entries each and ten thousand in all. An object found deeper, or inside a value of
another kind (an array of objects, a C extension's state), is not found: it comes back as
a copy inside its holder, as before.
"""

from __future__ import annotations

import collections
import functools
import types
from collections.abc import Container, Iterable, Mapping
from typing import Any

from nbtask.notebook.analysis import SHELL_NAMES, is_history_name
from nbtask.notebook.carried import may_change
from nbtask.notebook.kept import RemoteValue

__all__ = ["SCANNED_ITEMS", "attributes_of", "cell_is_set", "named_inside"]

#: A container or object with more entries than this is not looked into.
SCANNED_ITEMS = 1000
#: How many containers or objects down from a value read its named objects are looked for.
_LEVELS = 4
#: How many entries one look reads at most, all values together.
_LOOKED_AT = 10_000
#: Functions travel with the globals they carry (:mod:`nbtask.notebook.carried`).
_ROUTINES = (types.FunctionType, types.BuiltinFunctionType, types.MethodType)


def named_inside(
    values: Mapping[str, Any], namespace: Mapping[str, Any], hidden: Container[str] = ()
) -> dict[str, Any]:
    """``{name: object}`` for the notebook's names bound to objects inside ``values``.

    Only objects a cell can change in place (no numbers, strings, modules, classes,
    functions or methods), and not the values themselves, nor values kept on the workers (used
    where they are kept), nor the shell's own names (``hidden``, IPython's history).
    """
    # The values' entries first: most cells read no container holding anything, and then
    # the namespace (which grows with every cell's history names) is not read at all.
    reached = _reached(values)
    if not reached:
        return {}
    named: dict[int, str] = {}
    for name, value in namespace.items():
        key = id(value)
        if key in reached and key not in named and _nameable(name, value, values, hidden):
            named[key] = name
    return {named[key]: item for key, item in reached.items() if key in named}


def _reached(values: Mapping[str, Any]) -> dict[int, Any]:
    """``{id: object}`` for what a bounded look inside ``values`` meets, in that order."""
    seen = {id(value) for value in values.values()}
    reached: dict[int, Any] = {}
    level = list(values.values())
    looked_at = 0
    for _ in range(_LEVELS):
        below = []
        for holder in level:
            for item in _entries(holder):
                looked_at += 1
                if looked_at > _LOOKED_AT:
                    return reached
                if id(item) in seen:
                    continue
                seen.add(id(item))
                reached[id(item)] = item
                below.append(item)
        level = below
    return reached


def _nameable(name: str, value: Any, values: Mapping[str, Any], hidden: Container[str]) -> bool:
    if name in values or name in hidden or name in SHELL_NAMES or is_history_name(name):
        return False
    if isinstance(value, (RemoteValue, *_ROUTINES)):
        return False
    return may_change(value)


def _entries(value: Any) -> Iterable[Any]:
    """What a look goes on to from ``value``: its items, or its attributes' values."""
    if isinstance(value, (str, bytes, bytearray, RemoteValue)):
        return ()
    if isinstance(value, (list, tuple, set, frozenset, collections.deque)):
        return value if len(value) <= SCANNED_ITEMS else ()
    if isinstance(value, dict):
        return list(value.values()) if len(value) <= SCANNED_ITEMS else ()
    called = _callback_entries(value)
    if called is not None:
        return called
    attributes = attributes_of(value)
    return list(attributes.values()) if len(attributes) <= SCANNED_ITEMS else ()


def _callback_entries(value: Any) -> list[Any] | None:
    """What a callback changes when called; ``None`` for another kind of value.

    A bound method's object, a partial's function and arguments, a function's closure
    cells and attributes.
    """
    if isinstance(value, types.MethodType):
        return [value.__self__, value.__func__]
    if isinstance(value, types.BuiltinMethodType):  # ``lst.append``; a module's function
        owner = value.__self__
        return [] if isinstance(owner, types.ModuleType) or owner is None else [owner]
    if isinstance(value, functools.partial):
        return [value.func, *value.args, *value.keywords.values()]
    if isinstance(value, types.FunctionType):
        cells = [cell.cell_contents for cell in value.__closure__ or () if cell_is_set(cell)]
        return [*cells, *vars(value).values()]
    return None


def cell_is_set(cell: types.CellType) -> bool:
    """Whether a closure cell holds a value (an empty one raises when read)."""
    try:
        cell.cell_contents  # noqa: B018  # an empty cell raises
    except ValueError:
        return False
    return True


def attributes_of(value: Any) -> Mapping[str, Any]:
    """An instance's ``__dict__``; never a module's or a class's, nor a ``__getattr__``'s."""
    if isinstance(value, (types.ModuleType, type)) or not type(value).__dictoffset__:
        return {}
    try:
        attributes = object.__getattribute__(value, "__dict__")
    except Exception:  # a class of its own making
        return {}
    return attributes if isinstance(attributes, dict) else {}
