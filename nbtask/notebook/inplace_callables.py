"""A function, bound method or ``functools.partial`` a cell changed, written into the notebook's.

Part of :mod:`nbtask.notebook.inplace`. A function's state a cell can change is its
attributes (``f.calls += 1``), its defaults (``def remember(v, seen=[])``) and what its
closure keeps (``nonlocal c; c += 1``, a list it appends to): written into the notebook's
function, its closure cells (which the functions made with it share) included, as locally.
A bound method (``append_to = lst.append``) or a partial of one changes the objects it
calls: each is written into the notebook's own, so the callback still reaches them.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Mapping
from typing import Any

from nbtask.notebook.reach import cell_is_set

__all__ = ["callable_update", "is_callback", "replace_dict"]

Swap = Callable[[Any], Any]
Update = Callable[[Any, Any, Swap], None]
UpdateFor = Callable[[Any, Any], "Update | str"]

#: Values equal ones of which no cell can tell apart: a partial's ``3`` needs no writing.
_ATOMS = (int, float, complex, str, bytes, bool, type(None))


def callable_update(old: Any, new: Any, update_for: UpdateFor) -> Update | str | None:
    """How to write ``new`` into ``old`` of the same type, why it cannot be, or ``None``.

    ``None``: not a function, method or partial. ``update_for`` tells it for their parts.
    """
    if isinstance(old, _ATOMS):
        return _nothing if old == new else None
    if type(old) is types.FunctionType:
        if old.__code__ != new.__code__:
            return "its code changed"
        return functools.partial(_function, update_for=update_for)
    return _parts_update(old, new, update_for)


def _parts_update(old: Any, new: Any, update_for: UpdateFor) -> Update | str | None:
    """A bound method's or a partial's: each part it calls written into the old one's."""
    shape, before = _parts(old)
    new_shape, after = _parts(new)
    if shape is None:
        return None
    if shape != new_shape:
        return "it calls another object now"
    found = [update_for(a, b) for a, b in zip(before, after, strict=True)]
    for why in found:
        if isinstance(why, str):
            return f"what it calls cannot be written in place: {why}"

    def update(_old: Any, _new: Any, swap: Swap) -> None:
        for part, new_part, write in zip(before, after, found, strict=True):
            write(part, new_part, swap)  # type: ignore[operator]  # each is an Update

    return update


def is_callback(value: Any) -> bool:
    """Whether ``value`` is a bound method or a partial (held in a dict of handlers)."""
    return _parts(value)[0] is not None


def _parts(value: Any) -> tuple[tuple[Any, ...] | None, list[Any]]:
    """What a bound method or a partial calls, with what tells two of them alike.

    ``(None, [])`` for another kind.
    """
    if isinstance(value, types.MethodType):
        return ("method",), [value.__self__, value.__func__]
    if isinstance(value, types.BuiltinMethodType):  # ``lst.append``
        return ("builtin", value.__name__), [value.__self__]
    if isinstance(value, functools.partial):
        keys = tuple(value.keywords)
        return ("partial", len(value.args), keys), [
            value.func,
            *value.args,
            *value.keywords.values(),
        ]
    return None, []


def _nothing(old: Any, new: Any, swap: Swap) -> None:
    return None


def _function(old: Any, new: Any, swap: Swap, *, update_for: UpdateFor) -> None:
    """Attributes, defaults and closure cells of ``new`` into ``old`` (not its globals)."""
    replace_dict(vars(old), vars(new), swap)
    old.__defaults__ = _defaults(old.__defaults__, new.__defaults__, swap, update_for)
    kwdefaults = _defaults(old.__kwdefaults__, new.__kwdefaults__, swap, update_for)
    old.__kwdefaults__ = kwdefaults
    old.__doc__ = new.__doc__
    for old_cell, new_cell in zip(old.__closure__ or (), new.__closure__ or (), strict=True):
        _closure_cell(old_cell, new_cell, swap, update_for)


def _defaults(old: Any, new: Any, swap: Swap, update_for: UpdateFor) -> Any:
    """``new`` defaults, where each changed in place is written into the old default.

    ``def remember(v, seen=[])``: the cell's ``seen.append(v)`` is made to the notebook's
    own list, which whatever holds it sees. A tuple of positional defaults, or a dict of
    keyword-only ones.
    """
    if old is None or new is None or type(old) is not type(new) or len(old) != len(new):
        return new
    pairs = zip(old, new, strict=True) if isinstance(old, tuple) else None
    if pairs is None:
        if old.keys() != new.keys():
            return new
        return {key: _default(old[key], new[key], swap, update_for) for key in new}
    return tuple(_default(before, after, swap, update_for) for before, after in pairs)


def _default(old: Any, new: Any, swap: Swap, update_for: UpdateFor) -> Any:
    update = update_for(old, new)
    if isinstance(update, str):
        return swap(new)
    update(old, new, swap)
    return old


def _closure_cell(
    old: types.CellType, new: types.CellType, swap: Swap, update_for: UpdateFor
) -> None:
    """What the closure keeps, into the notebook function's own cell.

    A function held there (a recursive inner one, which holds itself) is left as it is.
    """
    try:
        after = new.cell_contents
    except ValueError:  # empty: the cell deleted it
        if cell_is_set(old):
            del old.cell_contents
        return
    if not cell_is_set(old):
        old.cell_contents = swap(after)
    elif not isinstance(old.cell_contents, types.FunctionType):
        old.cell_contents = _default(old.cell_contents, after, swap, update_for)


def replace_dict(old: dict[str, Any], new: Mapping[str, Any], swap: Swap) -> None:
    """Make ``old`` hold ``new``'s items, each value through ``swap``, as the same dict."""
    items = [(key, swap(value)) for key, value in new.items()]
    old.clear()
    old.update(items)
