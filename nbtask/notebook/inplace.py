"""Values a cell changed in place come back into the notebook's own objects.

Locally, a cell that changes a value in place (``model["coef"] = 2``) changes the one
object every name, container, attribute or closure holding it sees. A ``%%task`` cell's
value comes back unpickled, a new object: bound to its name it would leave the other
holders of the old one (``models["lr"]``) with the value from before the cell.
:func:`bring_back` instead writes the new state into the notebook's object, which keeps
its identity: a list, dict, set, bytearray, deque, a numpy array of the same shape and
dtype, a pandas frame or series of the same shape, a function's attributes, and any
object whose state is all in its ``__dict__`` and ``__slots__`` (classes written in
Python: a scikit-learn estimator, a dataclass). Any other (an array whose shape changed, an
object with state in C, a value kept on the workers) is bound anew, as before; if the old
object is still referenced besides its name, one line says so, naming the notebook's
variables that hold it where a cheap look finds them. A value kept on the workers is bound
to the notebook's other names for the old object too (they stand for the changed value, as
locally), and only its other holders are named.

The new objects of one cell arrive in one pickle, sharing what they shared on the worker;
those written into old objects are replaced by the old ones wherever the cell's values
hold them (``b = a`` after ``a.append(1)``: ``b is a`` as locally; ``models["g"]["lr"]``
when ``models`` came back too; an object's parts that link back to it; a tuple holding one,
``pipe.steps[0]``, by a new tuple holding the old object). The notebook's objects a cell
reaches inside the values it reads travel as shipped names of their own
(:mod:`nbtask.notebook.reach`), so ``l`` of ``l = d["a"]`` comes back, written into, when
``d["a"].append(3)`` changed it.
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Callable, Collection, Iterable, Mapping, MutableMapping
from typing import Any

from nbtask.notebook.analysis import is_history_name
from nbtask.notebook.inplace_attributes import attributes_update, state_is_attributes
from nbtask.notebook.inplace_callables import Swap, Update, callable_update, is_callback
from nbtask.notebook.kept import RemoteValue
from nbtask.notebook.reach import SCANNED_ITEMS, attributes_of

__all__ = ["bring_back", "write_into"]

_NAMED_HOLDERS = 3


def bring_back(
    namespace: MutableMapping[str, Any],
    arrived: dict[str, Any],
    in_place: Iterable[str],
    say: Callable[[str], None],
) -> dict[str, Any]:
    """The values to bind for ``arrived``, having written those changed in place into the old.

    Parameters
    ----------
    namespace
        The notebook's namespace, holding the values from before the cell.
    arrived
        The cell's values as they came back (one pickle); emptied, so that the new objects
        written into old ones are let go.
    in_place
        Those of ``arrived``'s names the cell changed in place without rebinding them (the
        worker saw the object it was shipped); only those the notebook still holds count.
    say
        Called with the line to show for an object that came back as a new one while
        something besides its name still holds the old one, or whose writing into the old
        one failed (that name alone comes back new; the cell's others are still written).

    Returns
    -------
    dict
        ``{name: value}`` to bind: the old object for a value written into it, the new one
        otherwise (an old one where the cell's values shared it).
    """
    olds: dict[str, Any] = {n: namespace[n] for n in in_place if n in arrived and n in namespace}
    # In comprehensions: no loop variable is left holding an old object (counted below).
    found = {name: _update_for(old, arrived[name]) for name, old in olds.items()}
    updates = {name: how for name, how in found.items() if not isinstance(how, str)}
    why_not = {name: how for name, how in found.items() if isinstance(how, str)}
    swapped = {id(arrived[n]): olds[n] for n in updates}

    def swap(value: Any) -> Any:
        return swapped.get(id(value), value)

    held = {n: _callbacks_in(olds[n]) for n in updates}  # before the writing replaces them
    for name, update in list(updates.items()):
        try:
            update(olds[name], arrived[name], swap)
        except Exception as exc:  # one name lost, never the cell's others
            del updates[name]
            swapped.pop(id(arrived[name]), None)
            say(
                f"nbtask: {name} came back as a new object (writing it into the notebook's "
                f"object failed: {type(exc).__name__}: {exc}): other references to the old "
                "one may see it partly changed"
            )
    for name, callbacks in held.items():
        _say_callbacks_copied(name, olds[name], callbacks, say)
    # Kept on the workers (``--keep``, or it grew large): the old object's other names
    # are bound to the reference too, as locally they would see the change.
    aliases = {
        other: arrived[name]
        for name in why_not
        if isinstance(arrived[name], RemoteValue)
        for other in _names_of(namespace, olds[name])
        if other not in arrived
    }
    for name, why in why_not.items():
        # The old object's holders: ``olds``, ``namespace`` (its other names, rebound
        # below, aside) and getrefcount's argument.
        named = sum(1 for other in aliases if namespace[other] is olds[name])
        if sys.getrefcount(olds[name]) - named > 3:
            holders = [h for h in _holders(namespace, name, olds[name]) if h not in aliases]
            say(_stale_line(name, why, holders))
    bound = {name: swap(value) for name, value in arrived.items()}
    bound.update(aliases)
    written = [arrived[n] for n in updates if arrived[n] is not olds[n]]
    arrived.clear()  # what still holds a new object written into an old one is the cell's
    if any(sys.getrefcount(new) > 3 for new in written):  # ``written``, ``new``, the argument
        _swap_deeper(bound, swapped)
    return bound


def _swap_deeper(bound: dict[str, Any], swapped: Mapping[int, Any]) -> None:
    """Replace the new objects written into old ones wherever the cell's values hold them.

    ``models`` and ``model`` both changed: ``models['group']['lr']`` is the notebook's
    ``model`` again. Only the lists, dicts, deques, tuples and plain objects the cell's
    values are made of are walked and changed (the old objects' own items were swapped
    already, as were the values bound to names). A tuple cannot be changed: one holding
    such an object (``pipe.steps[0]``, a ``(name, step)`` pair) came back new, and is
    replaced, where it is held and under a name bound to it, by one holding the old object.
    """
    holding = _Holding(swapped)
    for name, value in bound.items():
        bound[name] = holding.old(value)
    seen: set[int] = set()
    plain: dict[type, bool] = {}  # by class: whether its instances are walked
    stack = list(bound.values())
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        kind = type(value)
        if kind is tuple:
            stack.extend(value)
            continue
        if kind not in plain:
            plain[kind] = state_is_attributes(kind)
        if plain[kind]:
            attributes = attributes_of(value)
            if attributes:  # its own ``__dict__``, not an empty stand-in whose id is reused
                stack.append(attributes)
            continue
        for key, item in _keyed_items(value):
            held = holding.old(item)
            if held is not item:
                value[key] = held
            if id(item) not in swapped:  # an old object's items were swapped already
                stack.append(held)


def _callbacks_in(value: Any) -> dict[Any, Any]:
    """``{key: callback}`` of a list's or dict's items that are bound methods or partials."""
    return {key: item for key, item in _keyed_items(value) if is_callback(item)}


def _say_callbacks_copied(
    name: str, old: Any, callbacks: Mapping[Any, Any], say: Callable[[str], None]
) -> None:
    """Say which callbacks ``old`` held came back as copies, calling copies of their objects.

    ``handlers = {"add": data["k"].append}``: an item is replaced, not written into (the cell
    may have bound another callback there), so the copy calls a copy of ``data["k"]``.
    """
    now = dict(_keyed_items(old))
    copied = [f"{name}[{key!r}]" for key, item in callbacks.items() if now.get(key) is not item]
    if copied:
        more = " and more" if len(copied) > _NAMED_HOLDERS else ""
        shown = ", ".join(copied[:_NAMED_HOLDERS]) + more
        say(
            f"nbtask: {name}: the changes the cell made through {shown} were not applied: a "
            "callback held in a container comes back calling a copy of what it called, and "
            "later calls change the copy. Call it through a name of its own (add = "
            f"{copied[0]}, before the cell)"
        )


def _keyed_items(value: Any) -> list[tuple[Any, Any]]:
    """``(key, item)`` of a list, deque or dict, whose items can be replaced; else none."""
    if isinstance(value, (list, collections.deque)):
        return list(enumerate(value))
    if isinstance(value, dict):
        return list(value.items())
    return []


class _Holding:
    """What a cell's value holding a new object written into an old one holds instead."""

    def __init__(self, swapped: Mapping[int, Any]) -> None:
        self.swapped = swapped
        # Each tuple met, and the one that replaces it (itself if it holds none): one new
        # tuple however many hold it. The met one stays alive, its id its own.
        self._tuples: dict[int, tuple[tuple[Any, ...], tuple[Any, ...]]] = {}

    def old(self, value: Any) -> Any:
        """The old object for a new one, a tuple holding the old ones for a tuple, or ``value``."""
        if id(value) in self.swapped:
            return self.swapped[id(value)]
        if type(value) is not tuple:
            return value
        if id(value) not in self._tuples:
            items = [self.old(item) for item in value]
            same = all(new is item for new, item in zip(items, value, strict=True))
            self._tuples[id(value)] = (value, value if same else tuple(items))
        return self._tuples[id(value)][1]


def write_into(old: Any, new: Any) -> str | None:
    """Write ``new``'s state into ``old`` if it can be; else why not (``old`` left as it was)."""
    update = _update_for(old, new)
    if isinstance(update, str):
        return update
    update(old, new, _same)
    return None


def _same(value: Any) -> Any:
    return value


def _update_for(old: Any, new: Any) -> Update | str:
    """How to write ``new``'s state into ``old``, or why it cannot be."""
    if old is new:  # pickled by reference (a module's constant, an enum member)
        return _nothing
    if isinstance(new, RemoteValue):
        return "it is large and stays on the workers"
    kind = type(old)
    if kind is not type(new):
        return "its type changed"
    update = _BY_TYPE.get(kind)
    if update is not None:
        return update
    return _update_of_kind(old, new)


def _update_of_kind(old: Any, new: Any) -> Update | str:
    """How to write ``new`` into ``old`` of the same type, or why it cannot be."""
    kind = type(old)
    if kind is collections.deque:
        return _deque if old.maxlen == new.maxlen else "its maxlen changed"
    called = callable_update(old, new, _update_for)
    if called is not None:
        return called
    numpy = sys.modules.get("numpy")  # imported already if the value is an array
    # (A memory-mapped array too: written into, it stays mapped to its file.)
    if numpy is not None and kind in (numpy.ndarray, numpy.memmap):
        return _array_update(old, new)
    pandas = sys.modules.get("pandas")
    if pandas is not None and kind in (pandas.DataFrame, pandas.Series):
        return _pandas_update(old, new, pandas)
    return attributes_update(new)


def _nothing(old: Any, new: Any, swap: Swap) -> None:
    return None


def _list(old: Any, new: Any, swap: Swap) -> None:
    old[:] = [swap(item) for item in new]


def _dict(old: Any, new: Any, swap: Swap) -> None:
    items = [(key, swap(value)) for key, value in new.items()]
    old.clear()
    for key, value in items:  # item by item: ``Counter.update`` would add counts
        old[key] = value


def _defaultdict(old: Any, new: Any, swap: Swap) -> None:
    _dict(old, new, swap)
    old.default_factory = new.default_factory


def _set(old: Any, new: Any, swap: Swap) -> None:
    items = [swap(item) for item in new]
    old.clear()
    old.update(items)


def _bytearray(old: Any, new: Any, swap: Swap) -> None:
    old[:] = new


def _deque(old: Any, new: Any, swap: Swap) -> None:
    items = [swap(item) for item in new]
    old.clear()
    old.extend(items)


_BY_TYPE: dict[type, Update] = {
    list: _list,
    dict: _dict,
    collections.OrderedDict: _dict,
    collections.Counter: _dict,
    collections.defaultdict: _defaultdict,
    set: _set,
    bytearray: _bytearray,
}


def _array_update(old: Any, new: Any) -> Update | str:
    if old.shape != new.shape or old.dtype != new.dtype:
        return "its shape or dtype changed"
    if not old.flags.writeable:
        return "the notebook's array is read-only"
    return _array


def _array(old: Any, new: Any, swap: Swap) -> None:
    old[...] = new  # a view writes into the array it views, as the cell's change would have


def _pandas_update(old: Any, new: Any, pandas: Any) -> Update | str:
    """Frames and series through pandas' public API: values replaced, then labels.

    A frame whose rows or columns changed in number (a column added, rows dropped), or
    a series whose dtype changed, has no public way to be rewritten whole in place.
    """
    if old.shape != new.shape:
        return "its rows or columns changed in number"
    if isinstance(old, pandas.DataFrame):
        return _frame
    return _series if old.dtype == new.dtype else "its dtype changed"


def _frame(old: Any, new: Any, swap: Swap) -> None:
    for position in range(new.shape[1]):
        # By position, the new column's values and dtype (not aligned on the old labels).
        old.isetitem(position, new.iloc[:, position].array)
    _pandas_labels(old, new)
    old.columns = new.columns


def _series(old: Any, new: Any, swap: Swap) -> None:
    old.iloc[:] = new.array
    _pandas_labels(old, new)
    old.name = new.name


def _pandas_labels(old: Any, new: Any) -> None:
    old.index = new.index
    old.attrs = new.attrs
    old.flags.allows_duplicate_labels = new.flags.allows_duplicate_labels


def _stale_line(name: str, why: str, holders: Collection[str]) -> str:
    if holders:
        shown = ", ".join(sorted(holders)[:_NAMED_HOLDERS])
        more = " and more" if len(holders) > _NAMED_HOLDERS else ""
        held = f"{shown}{more} still {'holds' if len(holders) == 1 else 'hold'}"
    else:
        held = "other references to it (a container, an attribute, a closure) still see"
    return (
        f"nbtask: {name} came back as a new object ({why}): {held} the old one, as it was "
        "before the cell"
    )


def _names_of(namespace: Mapping[str, Any], old: Any) -> list[str]:
    """The notebook's names bound to ``old``, but IPython's history names (``_``, ``_3``)."""
    return [n for n, value in namespace.items() if value is old and not is_history_name(n)]


def _holders(namespace: Mapping[str, Any], name: str, old: Any) -> list[str]:
    """Which of the notebook's variables hold ``old``, themselves or one level down.

    A cheap look: the items of lists, tuples and dicts, and the attributes of objects,
    of up to a thousand entries each; the notebook's own hidden names (``_``) are skipped.
    """
    found: list[str] = []
    for holder_name, holder in list(namespace.items()):
        if holder_name == name or holder_name.startswith("_"):
            continue
        if holder is old:
            found.append(holder_name)
        elif isinstance(holder, (list, tuple)) and len(holder) <= SCANNED_ITEMS:
            found += [f"{holder_name}[{i}]" for i, item in enumerate(holder) if item is old]
        elif isinstance(holder, dict) and len(holder) <= SCANNED_ITEMS:
            found += [f"{holder_name}[{k!r}]" for k, item in holder.items() if item is old]
        else:
            attributes = attributes_of(holder)
            if len(attributes) <= SCANNED_ITEMS:
                found += [f"{holder_name}.{a}" for a, item in attributes.items() if item is old]
    return found
