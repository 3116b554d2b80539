"""Kept values held inside the notebook's containers: found, and replaced by their values.

A cell's values may hold a kept value's reference rather than a name bound to it: a dict a
cell made around a kept array (``d = {"k": arr}``, sent back with ``arr``'s reference in it
so that ``d["k"]`` and ``arr`` stay one object), a cell's large last expression in ``Out``.
Where the value is used, the reference is replaced by the value, as a name bound to it is:
in the kernel, by the fetched object when a local cell reads the container; on a worker, by
the loaded (or held) object when a ``%%task`` cell is sent the container.

Only the builtin containers are looked into (dicts, lists, tuples, sets), nested in any
depth: those are what a cell's values hold a reference in. A list or dict gets the value in
place (its other holders see it); a tuple or frozenset is made anew around it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from typing import Any

from nbtask.notebook.kept import RemoteValue
from nbtask.wire.blobs import Packed

__all__ = ["kept_inside", "may_hold_kept", "replace_inside"]

_CONTAINERS = (dict, list, tuple, set, frozenset)
_NAMED = RemoteValue.__qualname__.encode()
#: What gives a kept value for its reference (fetched, loaded...).
Load = Callable[[RemoteValue], Any]


def may_hold_kept(packed: object) -> bool:
    """Whether values ``packed`` (a :class:`Packed`) may hold a kept value's reference.

    Its class is named in the pickle of any that does: values without it are not walked
    (a list of ten million numbers, say).
    """
    if not isinstance(packed, Packed):
        return False
    stream = packed.stream
    return _NAMED in (stream if isinstance(stream, bytes) else bytes(stream))


def kept_inside(value: Any) -> list[RemoteValue]:
    """The kept values' references ``value`` holds inside it, each once (not ``value`` itself)."""
    found: dict[int, RemoteValue] = {}
    for item in _walk(value, set()):
        found.setdefault(id(item), item)
    return list(found.values())


def _walk(value: Any, seen: set[int]) -> Iterator[RemoteValue]:
    if type(value) not in _CONTAINERS or id(value) in seen:
        return
    seen.add(id(value))
    for item in value.values() if isinstance(value, dict) else value:
        if isinstance(item, RemoteValue):
            yield item
        else:
            yield from _walk(item, seen)


def replace_inside(value: Any, load: Load, keys: Collection[Any] | None = None) -> Any:
    """``value`` with the references it holds replaced by ``load(reference)``.

    ``keys``: of a dict, list or tuple, only the items under those keys or indexes (a
    cell that reads ``Out[5]`` only). Lists and dicts are changed in place; a tuple or
    frozenset holding a reference is made anew (returned: bind it where ``value`` was).
    """
    return _replaced(value, load, keys, {})


def _replaced(value: Any, load: Load, keys: Collection[Any] | None, done: dict[int, Any]) -> Any:
    if isinstance(value, RemoteValue):
        return load(value)
    if type(value) not in _CONTAINERS:
        return value
    if id(value) in done:  # met before (a cycle, or shared): as it became
        return done[id(value)]
    done[id(value)] = value
    if isinstance(value, (dict, list)):
        chosen = list(value) if isinstance(value, dict) else range(len(value))
        for key in [k for k in chosen if keys is None or k in keys]:
            item = value[key]
            new = _replaced(item, load, None, done)
            if new is not item:
                value[key] = new
        return value
    if isinstance(value, set):
        for item in list(value):
            new = _replaced(item, load, None, done)
            if new is not item:
                value.discard(item)
                value.add(new)
        return value
    made = _made_anew(value, load, keys, done)
    done[id(value)] = made
    return made


def _made_anew(
    value: tuple[Any, ...] | frozenset[Any],
    load: Load,
    keys: Collection[Any] | None,
    done: dict[int, Any],
) -> Any:
    """A tuple or frozenset with its references replaced: ``value`` if it holds none."""
    chosen = range(len(value)) if keys is None or isinstance(value, frozenset) else keys
    items = list(value)
    changed = [_replaced(v, load, None, done) if i in chosen else v for i, v in enumerate(items)]
    if all(new is old for new, old in zip(changed, items, strict=True)):
        return value
    return type(value)(changed)
