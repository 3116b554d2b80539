"""Telling the notebook that a cell changed the state of one of the notebook's own modules.

A module written next to the notebook (``helpers.py``) may hold state at its top level (a
counter, a cache, a registry) that its functions change. A ``%%task`` cell changes the
worker's copy of that state: the notebook's module stays as it was, whatever the cell did.
(A module or function of it the cell reads from the notebook arrives as a copy of the
kernel's, taken when the cell is sent; a module the cell imports is the worker's own, kept
by the worker process from cell to cell.) Nothing is brought back; so that the notebook is
not silently left with other values than a local run would give, the worker looks whether
such state changed (:func:`snapshot` before the cell, :func:`changed` after) and names
the modules whose state did, for the notebook to say so.
"""

from __future__ import annotations

import hashlib
import sys
import types
from collections.abc import Iterable, Mapping
from typing import Any

from nbtask.notebook.module_code import is_local, is_local_file
from nbtask.wire.blobs import Packed

__all__ = ["changed", "snapshot"]

#: Pickled size past which a module's value is told apart by identity only.
_LARGEST = 16 * 2**20
# Top-level bindings that are code, not state: a cell redefining them is not looked for.
_CODE = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type)

#: Per module name: the namespaces holding its top-level values here (the module's own,
#: and the globals its functions arrived with), and a digest of those values.
Snapshot = dict[str, tuple[list[dict[str, Any]], bytes]]


def snapshot(values: Iterable[Any], imported: Iterable[str]) -> Snapshot:
    """The state of the notebook's modules a cell uses, before it runs.

    ``values``: the cell's namespace (the modules and functions among them, as the cell
    reads them); ``imported``: the names of the notebook's modules the cell imports
    (``CellSpec.modules``), as this process has them loaded (one not loaded yet is
    imported fresh by the cell: its state before is not known, and it is not looked at).
    """
    found: dict[str, dict[int, dict[str, Any]]] = {}
    modules = [sys.modules.get(name) for name in imported]
    for value in [*values, *modules]:
        if isinstance(value, types.ModuleType) and is_local(value):
            _add(found, value.__name__, vars(value))
            for member in list(vars(value).values()):
                if isinstance(member, types.FunctionType) and member.__module__ == value.__name__:
                    _add(found, value.__name__, member.__globals__)
        elif isinstance(value, types.FunctionType):
            name = str(value.__module__)
            if is_local_file(name, value.__globals__.get("__file__")):
                _add(found, name, value.__globals__)
    return {
        name: (list(spaces.values()), _digest(spaces.values())) for name, spaces in found.items()
    }


def changed(before: Snapshot) -> list[str]:
    """The modules of ``before`` whose state the cell changed."""
    return sorted(name for name, (spaces, was) in before.items() if _digest(spaces) != was)


def _add(found: dict[str, dict[int, dict[str, Any]]], name: str, space: dict[str, Any]) -> None:
    found.setdefault(name, {})[id(space)] = space


def _digest(spaces: Iterable[Mapping[str, Any]]) -> bytes:
    """A digest of the top-level values that are not code.

    A value larger than :data:`_LARGEST` pickled (a dataset the module loads) counts by
    its identity alone: hashing it twice per cell would cost more than the cell, and
    its rebinding is still seen. One that cannot be pickled counts by identity too.
    """
    hashed = hashlib.blake2b(digest_size=16)
    for space in spaces:
        for name, value in sorted(space.items(), key=lambda item: item[0]):
            if name.startswith("__") or isinstance(value, _CODE):
                continue
            hashed.update(name.encode() + b"\0")
            try:
                packed = Packed.of(value)
            except Exception:
                packed = None
            if packed is None or packed.size > _LARGEST:
                hashed.update(b"id:%d\0" % id(value))
                continue
            hashed.update(packed.stream)
            for buffer in packed.buffers:
                hashed.update(buffer)
    return hashed.digest()
