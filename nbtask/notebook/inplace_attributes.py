"""An object of a class written in Python, written into the notebook's: its attributes.

Part of :mod:`nbtask.notebook.inplace`. Such an object's state is all in its ``__dict__``
and ``__slots__`` (a scikit-learn estimator, a dataclass): the cell's are written into the
notebook's object, bypassing any ``__setattr__``; a live resource the class leaves out of
its pickled state (a connection its ``__setstate__`` makes anew) stays the notebook's.
"""

from __future__ import annotations

import struct
import types
import weakref
from typing import Any

from nbtask.notebook.inplace_callables import Swap, Update, replace_dict

__all__ = ["attributes_update", "state_is_attributes"]

_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class made at run time (a ``class`` statement)
_POINTER = struct.calcsize("P")


def attributes_update(new: Any) -> Update | str:
    """How to write ``new``'s attributes into an object of its type, or why it cannot be."""
    if not state_is_attributes(type(new)):
        return f"a {type(new).__name__} keeps state that cannot be written in place"
    # Weakly referenced from its own state (a child's link back to its parent), moved
    # into the old object the link would still name the new one.
    if weakref.getweakrefcount(new):
        return "its state refers back to it"
    return _attributes


def state_is_attributes(kind: type) -> bool:
    """Whether ``kind``'s instances hold nothing but their ``__dict__`` and ``__slots__``.

    True of classes written in Python down to ``object``: each class of its layout chain
    is made at run time and adds to its base's size only its slots, and a dict or weakref
    pointer. A class of a C extension (``random.Random``'s base holds its state in C)
    adds fields of its own.
    """
    while kind is not object:
        base = kind.__base__
        if base is None or not kind.__flags__ & _HEAPTYPE:
            return False
        # A C type made at run time (``functools.partial``) has members no ``__slots__``
        # names, read-only ones among them.
        if _own_slots(kind) and "__slots__" not in vars(kind):
            return False
        pointers = len(_own_slots(kind))
        pointers += bool(kind.__weakrefoffset__) and not base.__weakrefoffset__
        pointers += kind.__dictoffset__ > 0 and not base.__dictoffset__
        if kind.__basicsize__ - base.__basicsize__ != pointers * _POINTER:
            return False
        kind = base
    return True


def _own_slots(kind: type) -> list[Any]:
    """The slot descriptors ``kind`` itself defines."""
    return [
        member
        for member in vars(kind).values()
        if isinstance(member, types.MemberDescriptorType) and member.__objclass__ is kind
    ]


def _attributes(old: Any, new: Any, swap: Swap) -> None:
    """Make ``old``'s ``__dict__`` and slots those of ``new``, bypassing any ``__setattr__``."""
    if type(new).__dictoffset__:  # not hasattr: a ``__getattr__`` would be asked
        replace_dict(vars(old), _attributes_shipped(old, new), swap)
    for kind in type(new).__mro__:
        for slot in _own_slots(kind):
            try:
                value = slot.__get__(new, kind)
            except AttributeError:  # unset in the new object: unset in the old one too
                if _is_set(slot, old, kind):
                    slot.__delete__(old)
                continue
            slot.__set__(old, swap(value))


def _attributes_shipped(old: Any, new: Any) -> dict[str, Any]:
    """``new``'s attributes to write into ``old``, less the live resources ``old`` holds.

    A class that pickles all but a resource (a ``__getstate__`` of its own leaving out a
    connection or a lock, which ``__setstate__`` makes anew when unpickled here) sent the
    cell none of it: ``old``'s own stays, as locally. Everything else is ``new``'s, what
    ``__setstate__`` rebuilt from the cell's state included (an index of its rows).
    """
    shipped: dict[str, Any] = vars(new)
    if getattr(type(new), "__getstate__", None) is getattr(object, "__getstate__", None):
        return shipped
    live = {key: value for key, value in vars(old).items() if _cannot_be_pickled(value)}
    return {**shipped, **live}


def _cannot_be_pickled(value: Any) -> bool:
    """Whether ``value`` refuses to be pickled at all (a connection, a lock, a file).

    Told by its own reduce, which such a type refuses at once; no content is copied
    (protocol 5 hands arrays over as buffers).
    """
    try:
        value.__reduce_ex__(5)
    except TypeError:
        return True
    except Exception:  # (its own method: anything else says nothing of a resource)
        return False
    return False


def _is_set(slot: Any, value: Any, kind: type) -> bool:
    try:
        slot.__get__(value, kind)
    except AttributeError:
        return False
    return True
