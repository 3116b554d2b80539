"""What a ``%%task`` cell sends back, worker side: its values packed, the large ones kept.

:func:`pack` packs the names a cell bound or changed (:mod:`nbtask.notebook.cell_changes`)
as one pickle, so that names sharing an object share it in the notebook; a value of
``keep_threshold`` bytes or more (or named with ``--keep``) stays on the workers
(:func:`keep_here`) and a reference travels in its place. :func:`shown_value` does the same
for the cell's last expression. The rest are what a running cell reaches of its task's
request: the store, this process's holding, the signer.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

from nbtask.brokers.base import Store
from nbtask.core.context import current_request
from nbtask.core.holding import HeldValue, Holding, keeper_namer, key_of, session_namer
from nbtask.errors import CellError
from nbtask.notebook import cell_changes, class_state, process_state
from nbtask.notebook.kept import RemoteValue, Sealing, keep
from nbtask.notebook.shipping import CellSpec, open_file
from nbtask.wire.blobs import Packed
from nbtask.wire.envelope import Signer, dumps

__all__ = [
    "ReadKept",
    "blob_store",
    "cell_signer",
    "held_value",
    "holding_here",
    "keep_here",
    "name_of",
    "namers_of",
    "pack",
    "shown_value",
]

#: A kept value a cell read: ``(value, its reference, its key by content when read)``.
ReadKept = tuple[Any, RemoteValue, str]


def blob_store() -> Store:
    """The store of the running cell's task (its kept values' copies)."""
    request = current_request()
    if request is None or request.blob_store is None:
        raise CellError("values kept on the workers can only be used in a %%task cell")
    return request.blob_store


def holding_here() -> Holding | None:
    """The kept values this process holds live, if it holds any (a worker's)."""
    request = current_request()
    return request.holding if request is not None else None


def cell_signer() -> Signer | None:
    """What checks the seals of sealed blobs in this process, if anything does."""
    request = current_request()
    return request.signer if request is not None else None


def namers_of(reference: RemoteValue) -> set[str]:
    """Who names ``reference``'s value here: the running cell's session, and its keeper.

    A holder keeps the value while a live session marks one of them (``core.holding``).
    """
    request = current_request()
    client = request.client if request is not None else ""
    namers = {session_namer(client)} if client else set()
    if reference.keeper:
        namers.add(keeper_namer(reference.keeper))
    return namers


def held_value(name: str, value: Any, reference: RemoteValue) -> HeldValue:
    """``value``, kept under ``reference``, as this process holds it.

    Held under its own key (:attr:`~nbtask.core.refs.ValueRef.key`), its key by content
    tells whether work changed it; a sealed value's is set once known.
    """
    held = HeldValue(value, name, reference.size, reference.made_by, namers=namers_of(reference))
    if not reference.sealed:
        held.content_key = functools.partial(str, reference.content_key)
    return held


def keep_here(name: str, value: Any, packed: Packed, spec: CellSpec) -> RemoteValue:
    """Keep an assigned value: its live object in this process, and its store copy.

    A value held here has its store copy written after the cell's outcome went out (the
    notebook's later work on it comes here; a reader of the copy waits for it).
    """
    holding = holding_here()
    held_here = holding is not None and holding.budget >= packed.size
    store, signer = blob_store(), cell_signer()
    # Held here and large, its store copy is written after the outcome went out: its blobs
    # are named by id and sealed as they are written, so their hash is not on the cell's
    # path. A smaller copy is written now, hashed: named by content, shared by its copies.
    sealed = held_here and store.writes_later(packed.size)
    sealing = Sealing(signer) if sealed and signer is not None else None
    put = functools.partial(store.put_blobs, later=held_here, seal=sealing)
    reference = keep(name, value, packed, put, sealed=sealing is not None)
    reference.made_by = spec.filename
    if holding is not None and held_here:
        reference.holder, reference.holder_pid = holding.queue, os.getpid()
        held = held_value(name, value, reference)
        if sealing is not None:
            sealing.reference = reference
            held.content_key = sealing.content_key
        holding.hold(reference.key, held)
    return reference


def pack(effects: dict[str, Any], spec: CellSpec, *, plain: bool) -> Any:
    """What a cell sends back of its ``effects``.

    See :func:`~nbtask.notebook.cellshell.execute_cell` for what it holds.

    ``plain``: just ``{name: value}``, nothing kept (a named cell's ``.delay``).
    """
    out: dict[str, Any] = effects["out"]
    # Bound to a notebook object the cell was sent: the notebook binds them to it.
    sent: dict[str, str] = {} if plain else effects.get("sent", {})
    for name in sent:
        del out[name]
    skipped = {name: why for name, value in out.items() if (why := open_file(value))}
    for name in skipped:
        del out[name]
    # Those held inside the values go as their names (persistent ids), not as copies.
    inside: cell_changes.SentObjects | None = None if plain else effects.get("inside")
    named = inside.persistent_id if inside is not None else None
    # Pickled as one dict, not from packs of each value: names that share an object
    # (``b = a``) must still share it in the kernel, as they would locally. A value that
    # stays here is kept once, whatever the names bound to it: one reference for all.
    kept = {} if plain else {key: ref for key, (_, ref) in effects.get("kept", {}).items()}
    # A notebook object the cell changed in place comes back into it (its other holders
    # see the change, as locally), large as it is: the notebook holds that much already.
    # Unless it grew by as much as a value kept (``store["x"] = big``): then it is kept,
    # and the notebook's names for it stand for the kept value.
    in_place: Mapping[str, int] = effects.get("in_place", {})
    home = {id(out[n]): in_place[n] for n in in_place if n in out and n not in spec.keep}
    blob = None if plain or kept else _packed_whole(out, spec, named)
    if blob is None:  # some value may stay here, or cannot be pickled: each packed
        packs: dict[str, tuple[Packed, bool]] = {}
        for name, value in list(out.items()):
            if id(value) in kept and name not in spec.fetch:
                out[name] = kept[id(value)]
                continue
            given = inside.given if inside is not None else 0
            try:
                # Large arrays stay uncopied, to travel out of band.
                packs[name] = Packed.of(value, named), inside is not None and inside.given > given
            except Exception as exc:
                skipped[name] = f"{type(value).__name__} cannot be pickled: {exc}"
                del out[name]
        if plain:
            return out
        read: Mapping[int, ReadKept] = effects.get("kept_read", {})
        naming = _KeptNaming(kept, named, read) if getattr(spec, "kept_inside", False) else None
        _keep_large(out, packs, kept, home, spec, naming)
        blob = Packed.of(out, naming or named)
    classes, unsent = class_state.pack(effects.get("classes_changed", []))
    changed = effects["state"]
    try:
        state = dumps(changed) if changed else process_state.NO_CHANGES
    except Exception:  # a warnings filter of a class only the worker has, say
        state = process_state.NO_CHANGES
    return {
        "values": blob,
        "names": sorted([*out, *sent]),
        "sent": sent,
        "skipped": skipped,
        "deleted": effects["deleted"],
        "held": effects.get("held", {}),
        # Changed in place, not rebound: the notebook updates its own object, as locally.
        "in_place": sorted(n for n in effects.get("in_place", ()) if n in out),
        "kept_in_place": sorted(n for n in effects.get("kept_in_place", ()) if n in out),
        "state": state,
        # The notebook objects the values hold, named (it loads them as they are): the
        # names given, those the shown value names too (packed after this).
        "sent_inside": inside.used if inside is not None else {},
        # The notebook's own modules whose top-level state the cell changed here.
        "modules_changed": effects.get("modules_changed", []),
        # The notebook's classes whose own attributes the cell changed, and what of them
        # could not come back (one line each).
        "classes_changed": classes,
        "classes_unsent": unsent,
    }


def _keep_large(
    out: dict[str, Any],
    packs: Mapping[str, tuple[Packed, bool]],
    kept: dict[int, RemoteValue],
    home: Mapping[int, int],
    spec: CellSpec,
    naming: _KeptNaming | None,
) -> None:
    """Keep here the values of ``out`` that stay (by size, or ``--keep``): references in it.

    ``packs``: each packed, and whether it names a notebook object. ``kept``: those kept
    (or sent back as the references they came as) so far, by id, added to.
    """
    # Smallest first: one that holds another kept here (``d = {"k": arr}``) holds its
    # reference, so that both names stand for one object in the notebook too.
    for name in sorted(packs, key=lambda n: packs[n][0].size):
        value = out[name]
        if id(value) in kept and name not in spec.fetch:  # kept under another name
            out[name] = kept[id(value)]
            continue
        packed, names_objects = packs[name]
        if naming is not None and naming.may_name() and _stays_here(name, packed.size, spec):
            given = naming.given
            packed = Packed.of(value, naming)  # its size without the kept ones in it
            names_objects = names_objects or naming.given > given
        grown = packed.size - home.get(id(value), 0)
        if not _stays_here(name, grown if id(value) in home else packed.size, spec):
            continue
        if names_objects:  # kept whole: it names nothing
            packed = Packed.of(value)
        out[name] = kept[id(value)] = keep_here(name, value, packed, spec)


class _KeptNaming:
    """A pickler's ``persistent_id``: a value kept here by its reference, else as ``named``.

    A value holding one (``d = {"k": arr}``) comes back holding the reference the notebook
    binds to ``arr``: fetched, ``d["k"] is arr``, and the bytes are not sent twice. So
    does one holding a kept value the cell read (``read``), if the cell left it unchanged.
    """

    def __init__(
        self,
        kept: Mapping[int, RemoteValue],
        named: Callable[[Any], str | None] | None,
        read: Mapping[int, ReadKept],
    ) -> None:
        self.kept, self.named, self.read = kept, named, read
        self._unchanged: dict[int, RemoteValue | None] = {}
        #: How many objects were named (a value pickled with none holds none).
        self.given = 0

    def may_name(self) -> bool:
        """Whether any kept value may be named by its reference."""
        return bool(self.kept or self.read)

    def __call__(self, value: Any) -> Any:
        found: RemoteValue | str | None = self.kept.get(id(value))
        if found is None and id(value) in self.read:
            found = self._if_unchanged(id(value))
        if found is None and self.named is not None:
            found = self.named(value)
        if found is not None:
            self.given += 1
        return found

    def _if_unchanged(self, key: int) -> RemoteValue | None:
        """The reference of a kept value the cell read, if it left it unchanged."""
        if key not in self._unchanged:
            value, reference, content = self.read[key]
            self._unchanged[key] = reference if key_of(value) == content else None
        return self._unchanged[key]


def _packed_whole(
    out: Mapping[str, Any], spec: CellSpec, named: Callable[[Any], str | None] | None
) -> Packed | None:
    """``out`` packed whole if none of its values can stay here, else ``None``.

    No value is kept by name, and the whole is well under the size from which a value is
    kept (a value alone pickles to no more than the dict holding it, give or take the
    numbering of shared objects): the usual cell's values, packed once, not twice.
    """
    if spec.keep or not out:
        return None
    try:
        packed = Packed.of(out, named)
    except Exception:  # one value cannot be pickled: each is, to name it
        return None
    threshold = spec.keep_threshold
    return packed if threshold is None or packed.size < threshold // 2 else None


def name_of(value: Any, scopes: list[Mapping[str, Any]]) -> str | None:
    """The first name bound to ``value`` itself in ``scopes``, if any."""
    return next((n for scope in scopes for n, v in scope.items() if v is value), None)


def shown_value(
    value: Any,
    same: str | None,
    skipped: Mapping[str, str],
    spec: CellSpec,
    inside: cell_changes.SentObjects | None,
) -> Any:
    """How the cell's last expression comes back as its ``Out``, as any assigned name would.

    ``("name", n)``: it is the value the notebook's ``n`` holds after the cell (``df`` of
    a cell ending with ``df``: the same object, as locally, sent once); ``("value",
    packed)``: the value, or its reference if it stays here (by its size); ``("skipped",
    why)``: it cannot be pickled, and the notebook shows the display sent for it.
    """
    if same is not None:
        return ("skipped", skipped[same]) if same in skipped else ("name", same)
    why = open_file(value)
    if why:
        return ("skipped", why)
    named = inside.persistent_id if inside is not None else None
    try:
        packed = Packed.of(value, named)
    except Exception as exc:
        return ("skipped", f"{type(value).__name__} cannot be pickled: {exc}")
    if _stays_here(spec.shows, packed.size, spec):
        kept = Packed.of(value) if named is not None else packed  # kept whole
        packed = Packed.of(keep_here(spec.shows, value, kept, spec))
    return ("value", packed)


def _stays_here(name: str, size: int, spec: CellSpec) -> bool:
    """Whether an assigned value stays on the workers (``--keep``, or its size)."""
    if name in spec.fetch:
        return False
    return name in spec.keep or (spec.keep_threshold is not None and size >= spec.keep_threshold)
