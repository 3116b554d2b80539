"""What a cell changed, worker side: the names it bound, the shipped values it changed.

Whether a shipped value changed is told by a digest of its pickled state taken before and
after the cell (:func:`digests`), or by its key for a value kept on the workers.
:func:`effects` lists the names to send back; :class:`SentObjects` the notebook objects
the cell was sent and left unchanged, which the notebook binds (as names, or where the
values sent back hold them) to its own objects rather than to copies.
"""

from __future__ import annotations

import contextlib
import hashlib
import types
from collections.abc import Container, Iterable, Mapping
from typing import Any

from nbtask.core.holding import key_of
from nbtask.notebook.analysis import is_history_name
from nbtask.notebook.carried import may_change
from nbtask.notebook.kept import RemoteValue
from nbtask.notebook.shipping import CellSpec
from nbtask.notebook.worker_shell import BASE_NS
from nbtask.wire.blobs import Packed

__all__ = ["SentObjects", "digest", "digests", "effects", "state"]

_IPYTHON_NAMES = frozenset({"_exit_code"})  # besides the history names


def effects(
    namespace: Mapping[str, Any],
    shipped: Mapping[str, Any],
    before: Mapping[str, bytes],
    spec: CellSpec,
    references: Mapping[str, RemoteValue],
) -> dict[str, Any]:
    """The names the cell bound or changed, and those it deleted.

    ``{"out": {name: value}, "deleted": [name], "sent": {name: shipped name}, "inside":
    SentObjects or None}``: ``sent``, the names of ``out`` the notebook binds to its own
    objects (see :class:`SentObjects`), if the kernel does (``spec.binds_sent``): a
    failed cell's too, as locally the names it bound before its failing line are those
    objects; ``inside``, what names those objects where the values hold them, if the
    kernel loads them so (``spec.sent_inside``).
    """
    out: dict[str, Any] = {}
    # A copy (taken at once): a thread the cell left running may bind names meanwhile.
    for name, value in list(namespace.items()):
        if name in BASE_NS and BASE_NS[name] is value:
            continue
        # Read, not rebound: send it back only if its pickled state changed.
        unchanged = name not in before or state(name, value, references) == before[name]
        if name in shipped and value is shipped[name] and name not in spec.assigned and unchanged:
            continue
        if name in _IPYTHON_NAMES or is_history_name(name):
            continue
        out[name] = value
    # A name the cell deleted, shipped or bound here first; "" from an older kernel.
    maybe_deleted = dict.fromkeys([*shipped, *getattr(spec, "deleted", ())])
    deleted = [n for n in maybe_deleted if n not in namespace]
    sent: dict[str, str] = {}
    inside = None
    if getattr(spec, "binds_sent", False):  # False: an older kernel
        names = [n for n in spec.names if n not in references]
        objects = SentObjects(shipped, names, before, out, namespace)
        sent = {name: source for name, value in out.items() if (source := objects.source(value))}
        # The kernel finds them inside the values too: named there, not copied (unless
        # none can be: the pickler then asks nothing of each object it pickles).
        inside = objects if getattr(spec, "sent_inside", False) and objects.nameable else None
    return {"out": out, "deleted": deleted, "sent": sent, "inside": inside}


class SentObjects:
    """The notebook's objects a cell was sent and left unchanged, by their shipped names.

    A name the cell binds to one (``alias = small``) is sent back as the shipped name
    (:meth:`source`): the notebook binds it to the object it sent under that name, so
    that ``alias is small`` holds there as locally, and nothing is sent back (nor kept on
    the workers) for it. Where the cell's values hold one (``pair = (small, 1)``), it is
    pickled as a persistent id naming it (:meth:`persistent_id`), which the notebook
    loads as its own object: ``pair[0] is small``. An object the cell changed in place
    comes back as a value, and is written into the notebook's own
    (:mod:`nbtask.notebook.inplace`).

    Parameters
    ----------
    shipped
        The values the cell was sent, by name.
    names
        Those of them that are the notebook's objects (not kept values, not datasets).
    before, out, namespace
        Their digests before the cell, what it sends back, its namespace after it.
    """

    def __init__(
        self,
        shipped: Mapping[str, Any],
        names: Iterable[str],
        before: Mapping[str, bytes],
        out: Mapping[str, Any],
        namespace: Mapping[str, Any],
    ) -> None:
        # The objects are alive (``shipped`` holds them): their ids stay theirs.
        self._by_id = {id(shipped[n]): n for n in names}
        #: Whether any can be named inside the values (see :meth:`persistent_id`).
        self.nameable = any(type(shipped[n]) not in _ATOMS for n in names)
        self._before, self._out, self._namespace = before, frozenset(out), namespace
        self._unchanged: dict[str, bool] = {}
        #: The shipped names given as persistent ids, in the order first given.
        self.used: dict[str, None] = {}
        #: How many persistent ids were given (a value pickled with none holds no object).
        self.given = 0

    def source(self, value: Any) -> str | None:
        """The shipped name of ``value`` if it is an object the cell was sent, unchanged."""
        source = self._by_id.get(id(value))
        if source is None:
            return None
        if source not in self._unchanged:
            # Still bound to its name and not sent back: the cell's check found it unchanged.
            bound = source not in self._out and self._namespace.get(source) is value
            before = self._before
            same = bound or source not in before or digest(value) == before[source]
            self._unchanged[source] = same
        return source if self._unchanged[source] else None

    def persistent_id(self, value: Any) -> str | None:
        """``value``'s shipped name, as a pickler's persistent id, if the notebook has it.

        Numbers, ``None`` and booleans are pickled as they are (as cheap, and no cell can
        tell two equal ones apart but by ``is``).
        """
        if type(value) in _ATOMS:
            return None
        source = self.source(value)
        if source is not None:
            self.used[source] = None
            self.given += 1
        return source


_ATOMS = frozenset({int, float, bool, type(None), complex})


def digests(
    values: Mapping[str, Any], skip: Container[str] = (), sizes: dict[str, int] | None = None
) -> dict[str, bytes]:
    """The digests of the values a cell may change in place, but those named in ``skip``.

    ``sizes``, if given, is told the pickled size of each (what the notebook holds).
    """
    found: dict[str, bytes] = {}
    for name, value in values.items():
        if may_change(value) and name not in skip:
            found[name], size = _digest_and_size(value)
            if sizes is not None:
                sizes[name] = size
    return found


def state(name: str, value: Any, references: Mapping[str, RemoteValue]) -> bytes:
    """What tells whether a shipped value changed: its key if it came as a kept value."""
    return key_of(value).encode() if name in references else digest(value)


def digest(value: Any) -> bytes:
    """A digest of a value's pickled state, its buffers hashed where they are (no copy).

    A function's state is its attributes (``f.calls += 1``) and its defaults (``seen`` of
    ``def remember(v, seen=[])``): its code does not change, and its globals are values
    of their own.
    """
    return _digest_and_size(value)[0]


def _digest_and_size(value: Any) -> tuple[bytes, int]:
    """:func:`digest`, and the size of the pickle it hashed (``b""``, 0: none)."""
    try:
        if isinstance(value, types.FunctionType):
            packed = _function_state(value)
        else:
            packed = Packed.of(value)
    except Exception:
        return b"", 0
    hashed = hashlib.blake2b(packed.stream, digest_size=16)
    for buffer in packed.buffers:
        hashed.update(buffer)
    return hashed.digest(), packed.size


def _function_state(function: types.FunctionType) -> Packed:
    """A function's attributes, defaults and closure pickled; its attributes alone if that fails.

    A closure's cells hold what it keeps (``nonlocal c; c += 1``, a list it appends to).
    """
    cells = []
    for cell in function.__closure__ or ():
        with contextlib.suppress(ValueError):  # an empty cell
            cells.append(cell.cell_contents)
    try:
        return Packed.of((vars(function), function.__defaults__, function.__kwdefaults__, cells))
    except Exception:  # a default that cannot be pickled (a lock): not looked at
        return Packed.of(vars(function))
