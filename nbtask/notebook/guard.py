"""Which running background cell a later cell waits for, by the names it reads.

A name waits when a background cell still running assigns or changes it, when it is
another name of the very object such a name is bound to (``alias`` of ``alias = lst``,
the cell changing ``lst``), and when it is a notebook function whose globals (or those of
the functions it calls) are such names (``lst`` of ``def add3(): lst.append(3)``), since
calling it reads them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from nbtask.notebook.carried import changeable, read_globals

if TYPE_CHECKING:
    from nbtask.notebook.cell_run import CellRun

__all__ = ["awaited", "pending_objects", "run_of"]

_MISSING = object()


def awaited(
    owner: Mapping[str, CellRun], namespace: Mapping[str, Any], reads: Iterable[str]
) -> list[str]:
    """The names a cell reading ``reads`` waits for: a background cell may change them.

    ``owner``: each pending name's run; ``namespace``: the notebook's.
    """
    if not owner:
        return []
    reads = list(dict.fromkeys(reads))
    objects = pending_objects(owner, namespace)
    found = [n for n in reads if run_of(n, owner, namespace, objects) is not None]
    values = {n: namespace[n] for n in reads if n in namespace}
    read = [n for n in read_globals(values, namespace) if n not in found]
    return [*found, *(n for n in read if run_of(n, owner, namespace, objects) is not None)]


def pending_objects(owner: Mapping[str, CellRun], namespace: Mapping[str, Any]) -> dict[int, str]:
    """``{id(object): pending name}`` of the objects pending names are bound to."""
    objects = {}
    for name in owner:
        value = namespace.get(name, _MISSING)
        if value is not _MISSING and changeable(value):
            objects[id(value)] = name
    return objects


def run_of(
    name: str,
    owner: Mapping[str, CellRun],
    namespace: Mapping[str, Any],
    objects: Mapping[int, str],
) -> tuple[CellRun, str] | None:
    """The run ``name`` waits for and the pending name it stands for; ``None``: none.

    ``objects``: see :func:`pending_objects`, found while the namespace was as now.
    """
    run = owner.get(name)
    if run is not None:
        return run, name
    value = namespace.get(name, _MISSING)
    if value is _MISSING or not changeable(value):
        return None
    pending = objects.get(id(value))
    return None if pending is None else (owner[pending], pending)
