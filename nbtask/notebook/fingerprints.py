"""Whether the notebook changed an object while a background cell worked on its copy.

A background ``%%task`` cell's in-place changes come back into the notebook's own object
(:mod:`nbtask.notebook.inplace`), written over what it holds then. If the notebook changed
that object meanwhile (through a name, an attribute or ``exec`` no guard saw), writing
would silently undo the notebook's change. A :class:`Fingerprint` taken as the cell is sent
tells, when its values come back, whether the object is still as it was sent.

It is cheap and bounded: the top-level items of a container (a shallow copy, compared by
identity), an array's bytes through a checksum; past ``_WHOLE`` items or ``_WHOLE_BYTES``
bytes, a sample spread over the whole plus the size, so that growth is always seen.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import types
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

from nbtask.notebook.carried import changeable

__all__ = ["Fingerprint", "changed_since", "fingerprint", "fingerprints"]

_WHOLE = 1_000_000  # items copied whole; a larger container is sampled this many times
_WHOLE_BYTES = 64 * 1024 * 1024  # an array checksummed whole; a larger one sampled


@dataclasses.dataclass(eq=False)
class Fingerprint:
    """What an object held when a cell was sent: enough to tell it changed since.

    Attributes
    ----------
    of : int
        The object's ``id``: another object bound to the name now is a change.
    size : tuple
        Its length, or an array's shape, dtype and checksum, compared by equality.
    items : list
        Its top-level items (a sample of a large one), compared by identity.
    """

    of: int
    size: tuple[Any, ...]
    items: list[Any]

    def matches(self, value: Any) -> bool:
        """Whether ``value`` is the object fingerprinted, holding what it held then."""
        now = fingerprint(value)
        return (
            now is not None
            and now.of == self.of
            and now.size == self.size
            and len(now.items) == len(self.items)
            and all(a is b for a, b in zip(now.items, self.items, strict=True))
        )


def fingerprints(namespace: Mapping[str, Any], names: Iterable[str]) -> dict[str, Fingerprint]:
    """``{name: Fingerprint}`` of the values of ``names`` whose changes can be told."""
    found = {}
    for name in names:
        taken = fingerprint(namespace.get(name))
        if taken is not None:
            found[name] = taken
    return found


def changed_since(
    prints: Mapping[str, Fingerprint], namespace: Mapping[str, Any], names: Iterable[str]
) -> list[str]:
    """Those of ``names`` fingerprinted in ``prints`` whose value in ``namespace`` changed."""
    return [n for n in names if n in prints and not prints[n].matches(namespace.get(n))]


def fingerprint(value: Any) -> Fingerprint | None:
    """``value``'s fingerprint; ``None`` for a kind whose changes are not looked for."""
    found = _container_print(value) or _definition_print(value)
    if found is not None:
        return found
    numpy = sys.modules.get("numpy")  # imported already if the value is an array
    if numpy is not None and isinstance(value, numpy.ndarray):
        return _array_print(value, numpy)
    pandas = sys.modules.get("pandas")
    if pandas is not None and isinstance(value, (pandas.DataFrame, pandas.Series)):
        return _pandas_print(value, pandas, numpy)
    attributes = _own_dict(value)
    if attributes is not None and changeable(value):
        return _attributes_print(value, attributes, [])
    return None


def _container_print(value: Any) -> Fingerprint | None:
    """A list's, deque's, set's, dict's or bytearray's print; ``None`` for another kind."""
    if isinstance(value, (list, collections.deque, set)):
        return Fingerprint(id(value), (type(value), len(value)), _sample(value))
    if isinstance(value, dict):
        keys, items = _sample(value), _sample(value.values())
        return Fingerprint(id(value), (type(value), len(value)), [*keys, *items])
    if isinstance(value, bytearray):
        return Fingerprint(id(value), (len(value), _checksum(memoryview(value))), [])
    return None


def _attributes_print(value: Any, attributes: Mapping[str, Any], more: list[Any]) -> Fingerprint:
    keys, items = _sample(attributes), _sample(attributes.values())
    return Fingerprint(id(value), (len(attributes),), [*keys, *items, *more])


def _definition_print(value: Any) -> Fingerprint | None:
    """A function's or notebook class's print; ``None`` for another kind."""
    if isinstance(value, types.FunctionType):
        defaults = (value.__defaults__, value.__kwdefaults__)
        return _attributes_print(value, vars(value), [*defaults])
    if isinstance(value, type) and value.__module__ == "__main__":
        return _class_print(value)
    return None


def _class_print(value: type) -> Fingerprint:
    """A notebook class's own attributes, and the length of those that are containers.

    ``Counter.registry.append(1)`` in the notebook changes the length it holds.
    """
    attributes = dict(vars(value))
    found = _attributes_print(value, attributes, [])
    sizes = [len(v) for v in attributes.values() if isinstance(v, _SIZED)]
    return Fingerprint(found.of, (*found.size, *sizes), found.items)


_SIZED = (list, dict, set, collections.deque, bytearray)


def _sample(items: Any) -> list[Any]:
    """The items whole, or ``_WHOLE`` of them spread over the container."""
    copied = list(items) if len(items) <= _WHOLE else None
    if copied is not None:
        return copied
    step = len(items) // _WHOLE + 1
    return [item for index, item in enumerate(items) if index % step == 0]


def _array_print(value: Any, numpy: Any) -> Fingerprint:
    size: tuple[Any, ...] = (value.shape, value.dtype.str, value.strides)
    if value.dtype.hasobject:  # references: compared by identity, as a list's items
        flat = value.reshape(-1) if value.flags.c_contiguous else value.flat
        return Fingerprint(id(value), size, _sample(flat))
    if value.nbytes <= _WHOLE_BYTES:
        whole = numpy.ascontiguousarray(value)
        return Fingerprint(id(value), (*size, _checksum(memoryview(whole).cast("B"))), [])
    positions = numpy.linspace(0, value.size - 1, _WHOLE, dtype=numpy.intp)
    sampled = numpy.ascontiguousarray(value.flat[positions])
    return Fingerprint(id(value), (*size, _checksum(memoryview(sampled).cast("B"))), [])


def _pandas_print(value: Any, pandas: Any, numpy: Any) -> Fingerprint:
    """A frame's or series' labels (by identity), and each column as an array's print."""
    if isinstance(value, pandas.Series):
        columns = [value.to_numpy()]
        labels = [value.index, value.name]
    else:
        columns = [value.iloc[:, position].to_numpy() for position in range(value.shape[1])]
        labels = [value.index, value.columns]
    prints = [_array_print(column, numpy) for column in columns]
    size = (value.shape, *(print_.size for print_ in prints))
    items = [item for print_ in prints for item in print_.items]
    return Fingerprint(id(value), size, [*labels, *items])


def _checksum(data: memoryview) -> int:
    if data.nbytes <= _WHOLE_BYTES:
        return zlib.crc32(data)
    step = data.nbytes // _WHOLE_BYTES + 1  # bytes: about _WHOLE_BYTES of them, spread
    return zlib.crc32(data[::step].tobytes())


def _own_dict(value: Any) -> dict[str, Any] | None:
    """An instance's ``__dict__``; never a module's or a class's, nor a ``__getattr__``'s."""
    if isinstance(value, (types.ModuleType, type)) or not type(value).__dictoffset__:
        return None
    try:
        attributes = object.__getattribute__(value, "__dict__")
    except Exception:  # a class of its own making
        return None
    return attributes if isinstance(attributes, dict) else None
