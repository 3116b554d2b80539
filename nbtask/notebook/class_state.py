"""A cell's changes to the notebook's classes: their own attributes come back.

Locally ``Counter.count += 1`` or ``Counter.registry.append("x")`` changes the one class
every instance and function of the notebook sees. A class defined in the notebook travels
by value (cloudpickle): the worker changes its copy. :func:`snapshot` notes, worker side,
the own attributes (``vars(cls)``) of the notebook's classes a cell was sent or reaches
through the functions it calls, and :func:`changes` what the cell rebound, added, deleted
or changed in place among them; :func:`apply` sets them on the notebook's class, a value
changed in place written into the notebook's own object (:mod:`nbtask.notebook.inplace`).

Cheap for a cell that reads no notebook class: nothing is looked at. For one that does,
each attribute is compared by identity, and those that may change in place (lists,
dicts, objects: not functions, descriptors or numbers) by a digest of their pickled state.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from nbtask.notebook.carried import may_change
from nbtask.notebook.cell_changes import digest
from nbtask.notebook.inplace import write_into
from nbtask.wire.blobs import Packed

__all__ = ["ClassState", "apply", "changes", "pack", "snapshot", "target"]

#: A class's own entries that are the class's make-up, not state a cell sets.
_MAKE_UP = frozenset({"__dict__", "__weakref__", "__module__", "__qualname__", "_abc_impl"})
#: Attribute values compared by identity only: rebinding them is their only change.
_BY_IDENTITY = (
    types.FunctionType,
    classmethod,
    staticmethod,
    property,
    types.MemberDescriptorType,
    types.GetSetDescriptorType,
)


class ClassState:
    """A notebook class's own attributes as a cell was given them, to tell its changes.

    ``anchor``: the shipped name the class was found through (itself, an instance of it
    or of a subclass), by which the notebook finds its own class again.
    """

    def __init__(self, cls: type, anchor: str) -> None:
        self.cls, self.anchor = cls, anchor
        self.values = {k: v for k, v in vars(cls).items() if k not in _MAKE_UP}
        self.digests = {k: digest(v) for k, v in self.values.items() if _may_change(k, v)}

    def changed(self) -> dict[str, Any] | None:
        """What the cell changed; ``None``: nothing.

        ``{"anchor", "qualname", "set": {attr: value}, "in_place": {attr: value},
        "deleted": [attr]}``.
        """
        now = {k: v for k, v in vars(self.cls).items() if k not in _MAKE_UP}
        rebound = {k: v for k, v in now.items() if self.values.get(k, _GONE) is not v}
        in_place = {
            k: v
            for k, v in now.items()
            if k not in rebound and k in self.digests and digest(v) != self.digests[k]
        }
        deleted = [k for k in self.values if k not in now]
        if not (rebound or in_place or deleted):
            return None
        return {
            "anchor": self.anchor,
            "qualname": self.cls.__qualname__,
            "set": rebound,
            "in_place": in_place,
            "deleted": deleted,
        }


_GONE = object()


def _may_change(name: str, value: Any) -> bool:
    """Whether an attribute is looked at for changes in place (not the class's dunders)."""
    dunder = name.startswith("__") and name.endswith("__")
    return not dunder and may_change(value) and not isinstance(value, _BY_IDENTITY)


def snapshot(values: Mapping[str, Any]) -> list[ClassState]:
    """The state of each class defined in the notebook that ``values`` are or are made of.

    Those among them, the classes of the instances among them, and their bases defined
    in the notebook; each once, found through its own name first.
    """
    found: dict[int, ClassState] = {}
    classes = [(n, v) for n, v in values.items() if _of_notebook(v)]
    instances = [(n, type(v)) for n, v in values.items() if _of_notebook(type(v))]
    for name, cls in [*classes, *instances]:
        for each in cls.__mro__:
            if id(each) not in found and _of_notebook(each):
                found[id(each)] = ClassState(each, name)
    return list(found.values())


def _of_notebook(value: Any) -> bool:
    return isinstance(value, type) and value.__module__ == "__main__"


def changes(states: Iterable[ClassState]) -> list[dict[str, Any]]:
    """What the cell changed of each class's own attributes."""
    return [changed for state in states if (changed := state.changed()) is not None]


def target(namespace: Mapping[str, Any], change: Mapping[str, Any]) -> type | str:
    """The notebook's class ``change`` is for, found through its anchor; else why not."""
    anchor = namespace.get(change["anchor"], _GONE)
    cls = anchor if isinstance(anchor, type) else type(anchor)
    for each in cls.__mro__:
        if _of_notebook(each) and each.__qualname__ == change["qualname"]:
            return each
    return f"the notebook no longer has {change['qualname']} as {change['anchor']} was sent"


def pack(changed: list[dict[str, Any]]) -> tuple[Packed | None, list[str]]:
    """``changed`` pickled to go back, and a line for each attribute that cannot.

    Each attribute that cannot be pickled is left out, and said.
    """
    if not changed:
        return None, []
    try:
        return Packed.of(changed), []
    except Exception:
        pass
    lines = []
    for change in changed:
        name = change["qualname"]
        for kind in ("set", "in_place"):
            for attribute, value in list(change[kind].items()):
                try:
                    Packed.of(value)
                except Exception as exc:
                    del change[kind][attribute]
                    lines.append(
                        f"nbtask: {name}.{attribute}: the cell's change to it did not come back: "
                        f"{type(value).__name__} cannot be pickled ({exc}); the notebook's "
                        f"{name}.{attribute} is left as it was before the cell"
                    )
    try:
        return Packed.of(changed), lines
    except Exception as exc:
        names = ", ".join(change["qualname"] for change in changed)
        return None, [f"nbtask: the cell's changes to {names} did not come back: {exc}"]


def apply(
    changed: Iterable[tuple[Mapping[str, Any], type | str]], say: Callable[[str], None]
) -> None:
    """Set a cell's changed class attributes on the notebook's classes.

    ``changed``: each change with the notebook's class it is for (:func:`target`), or why
    it is not applied (the class is gone, the notebook changed it meanwhile), said in one
    line; so is a value changed in place that comes back as a new one.
    """
    for change, cls in changed:
        name = change["qualname"]
        if isinstance(cls, str):
            listed = ", ".join([*change["set"], *change["in_place"], *change["deleted"]])
            say(f"nbtask: the cell's changes to class {name} ({listed}) were not applied: {cls}")
            continue
        for attribute, value in change["set"].items():
            setattr(cls, attribute, value)
        for attribute, value in change["in_place"].items():
            old = vars(cls).get(attribute, _GONE)
            why = "the notebook's class no longer has it" if old is _GONE else None
            if why is None:
                why = write_into(old, value)
            if why is not None:
                setattr(cls, attribute, value)
                say(
                    f"nbtask: {name}.{attribute} came back as a new object ({why}): what "
                    "still holds the old one sees it as it was before the cell"
                )
        for attribute in change["deleted"]:
            if attribute in vars(cls):
                delattr(cls, attribute)
