"""Writing a finished ``%%task`` cell's effects into the notebook, on the main thread.

:class:`WriteBack` is mixed into :class:`~nbtask.notebook.pending.Pending`, which decides
when a run's values are written; this is how: its values are loaded (together, else one at
a time, so one that cannot be loaded here loses no other), a kept value's reference is the
notebook's own where it has one, a value changed in place is written into the notebook's
object (unless the notebook changed that object meanwhile), deleted names go, the
attributes the cell changed of the notebook's classes are set on them
(:mod:`nbtask.notebook.class_state`), process-wide state changes are applied, and what
could not come back is said.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any

from nbtask.core.task_errors import unloadable_value, unloadable_values
from nbtask.notebook import class_state, process_state
from nbtask.notebook.analysis import is_history_name
from nbtask.notebook.carried import WithObjects, load_each, load_values, share_namespace
from nbtask.notebook.cell_run import CellRun, sent_objects_of
from nbtask.notebook.fingerprints import changed_since
from nbtask.notebook.follow import one_line
from nbtask.notebook.inplace import bring_back
from nbtask.notebook.kept import RemoteValue
from nbtask.notebook.kept_inside import kept_inside, may_hold_kept, replace_inside
from nbtask.wire.blobs import Packed
from nbtask.wire.envelope import Envelope
from nbtask.wire.events import lacks_code
from nbtask.wire.item_loads import SharedWithFailed

__all__ = ["WriteBack"]


class WriteBack:
    """How a finished cell's values and state changes are written into the namespace."""

    namespace: MutableMapping[str, Any]
    holds_kept: bool
    kept_holders: set[str]
    _on_kept: Callable[[RemoteValue], None] | None
    _apply_state: Callable[[Mapping[str, Any]], None]
    _modules_told: set[str]

    def took_kept(self, value: RemoteValue) -> None:
        """A kept value reached the notebook: bound to be fetched, and looked for in cells."""
        if self._on_kept is not None:
            self._on_kept(value)
            self.holds_kept = True

    def _apply(self, run: CellRun, effects: Mapping[str, Any]) -> None:
        """Write a cell's names and process-wide state changes into this kernel."""
        # Found before its values load and bind names (a notebook class they hold is set
        # anew as it loads): the notebook's classes whose attributes it changed.
        classes = self._classes_changed(run, effects)
        # The notebook's objects its values hold: loaded as they are, not as copies.
        objects = {n: run.sent[n] for n in effects.get("sent_inside", ()) if n in run.sent}
        arrived, unloaded = _loaded(run, effects, objects)
        run.shown = _with_objects(effects.get("shown"), objects)
        del objects
        known = self._known_references(arrived)
        # No loop variable left holding one of the values: bring_back counts references.
        for kept in [v for v in arrived.values() if isinstance(v, RemoteValue)]:
            if not any(kept is mine for mine in known):
                self.took_kept(kept)
        del known
        if may_hold_kept(effects.get("values")):
            self._took_kept_inside(arrived)
        changed = effects.get("kept_in_place", ())
        self._changed_kept(arrived, [n for n in changed if n not in run.superseded])
        in_place = [n for n in effects.get("in_place", ()) if n not in run.superseded]
        for name in self._changed_meanwhile(run, in_place):
            in_place.remove(name)
            arrived.pop(name, None)  # the notebook keeps its object, with its own change
        sent = sent_objects_of(run, effects.get("sent", {}))
        run.sent = {}  # not counted as a holder of the objects bring_back writes into
        arrived = bring_back(self.namespace, arrived, in_place, _say)  # empties the first
        arrived.update(sent)
        del sent
        for name, value in arrived.items():
            if name not in run.superseded:
                self.namespace[name] = value
        for name in effects.get("deleted", ()):
            if name not in run.superseded:
                self.namespace.pop(name, None)
        self._rehome(effects.get("held"))
        share_namespace(self.namespace, arrived)
        skipped = {**effects.get("skipped", {}), **unloaded}
        unknown = "the object it was bound to is no longer known here"
        skipped.update({n: unknown for n in effects.get("sent", {}) if n not in arrived})
        for name, why in skipped.items():
            self._not_brought_back(run, name, why)
        self._say_modules_changed(effects.get("modules_changed", ()))
        class_state.apply(classes, _say)
        state = effects.get("state")
        if state and state != process_state.NO_CHANGES:
            self._apply_state(Envelope({}, state).load_body())

    def _took_kept_inside(self, arrived: dict[str, Any]) -> None:
        """Note the values that hold kept values' references (``d = {"k": arr}``).

        A cell that reads one fetches those it holds (:meth:`Pending.wait`). Each stands
        for the notebook's own reference of its value where it has one (``d["k"] is
        arr``), else is bound to be fetched here.
        """
        holders = {n: inside for n, v in arrived.items() if (inside := _kept_inside(v))}
        if not holders:
            return
        self.kept_holders.update(holders)
        values = [*self.namespace.values(), *arrived.values()]
        mine: list[RemoteValue] = [v for v in values if isinstance(v, RemoteValue)]
        del values
        known = {(value.key, value.keeper): value for value in mine}
        for name, inside in holders.items():
            swap = {}
            for kept in inside:
                own = known.setdefault((kept.key, kept.keeper), kept)
                if own is kept and not any(kept is value for value in mine):
                    self.took_kept(kept)
                    mine.append(kept)
                elif own is not kept:
                    swap[id(kept)] = own
            if swap:
                arrived[name] = replace_inside(arrived[name], lambda ref: swap.get(id(ref), ref))  # noqa: B023

    def _changed_meanwhile(self, run: CellRun, names: Iterable[str]) -> list[str]:
        """Those of ``names`` whose notebook object changed since ``run`` was sent; said.

        The cell changed its copy; writing that into the notebook's object would undo what
        the notebook did to it meanwhile (through a name no guard saw: an attribute of
        another object, ``exec``). The notebook's change is kept, and one line says so.
        """
        prints, run.prints = run.prints, {}
        changed = changed_since(prints, self.namespace, names)
        for name in changed:
            _say(
                f"nbtask: {name}: the changes task {run.label!r} [{run.handle.id[:8]}] made "
                f"to it were not applied: the notebook changed {name} while the task ran, "
                "and applying them would have undone that. The notebook keeps its own "
                f"{name}; to have both, run the cell again (it starts from this {name}), "
                "or run such cells with --wait"
            )
        return changed

    def _classes_changed(
        self, run: CellRun, effects: Mapping[str, Any]
    ) -> list[tuple[Mapping[str, Any], type | str]]:
        """What the cell changed of the notebook's classes' own attributes, with each class.

        Or why it is not applied: a class the notebook defined anew, or changed (where no
        guard saw), while the cell ran: applying the cell's changes would undo the
        notebook's. What could not come back at all is said here.
        """
        for line in effects.get("classes_unsent", ()):
            _say(line)
        packed = effects.get("classes_changed")
        if not isinstance(packed, Packed):
            return []
        # Told before the changes load (a notebook class they hold is set anew as it loads).
        prints = run.prints  # a background cell's: its classes as they were sent
        named = {id(v): n for n, v in self.namespace.items() if isinstance(v, type) and n in prints}
        meanwhile = set(changed_since(prints, self.namespace, named.values()))
        try:
            changed: list[Mapping[str, Any]] = packed.load()
        except Exception as exc:
            _say(f"nbtask: the cell's changes to the notebook's classes did not come back: {exc}")
            return []
        found = [(change, class_state.target(self.namespace, change)) for change in changed]
        label = f"task {run.label!r} [{run.handle.id[:8]}]"
        why = (
            f"the notebook changed it while {label} ran, and applying them would have undone "
            "that; run such cells with --wait"
        )
        return [(c, why if named.get(id(cls)) in meanwhile else cls) for c, cls in found]

    def _say_modules_changed(self, names: Iterable[str]) -> None:
        """Say once per module that a cell changed its state on a worker, not here."""
        for name in names:
            if not isinstance(name, str) or name in self._modules_told:
                continue
            self._modules_told.add(name)
            _say(
                f"nbtask: the cell changed the state of the notebook's module {name!r} "
                "(its top-level values) on the worker; such changes stay there and this "
                "kernel's module is as it was. Return what you need as a variable of the cell"
            )

    def _known_references(self, arrived: dict[str, Any]) -> list[RemoteValue]:
        """Put the notebook's own reference in place of each that stands for the same value.

        A cell that binds a kept value it read to another name (``alias = big``) sends
        back the reference it was given (same keeper): the notebook's, so both names are
        bound to one object, as locally. Returns the references put in (already tracked);
        one whose value the cell's process now holds is told so.
        """
        if not any(isinstance(value, RemoteValue) for value in arrived.values()):
            return []  # the usual cell: no scan of a namespace that grows with every cell
        held = [v for v in self.namespace.values() if isinstance(v, RemoteValue) and v.keeper]
        known = {(value.key, value.keeper): value for value in held}
        put = []
        for name, value in arrived.items():
            mine = known.get((value.key, value.keeper)) if isinstance(value, RemoteValue) else None
            if mine is None or mine is value:
                continue
            if (mine.holder, mine.holder_pid) != (value.holder, value.holder_pid):
                mine.holder, mine.holder_pid = value.holder, value.holder_pid
                self.took_kept(mine)
            arrived[name] = mine
            put.append(mine)
        return put

    def _changed_kept(self, arrived: Mapping[str, Any], names: Iterable[str]) -> None:
        """Kept values a cell changed in place: every name bound to one sees the change.

        The change comes back under a new reference for the names the cell used; the
        notebook's other names for the old reference (``alias`` of ``alias = big``, when
        the cell changed ``big``) are bound to the new one too, as locally, and the
        containers that hold it hold the new one.
        """
        for name in names:
            old, new = self.namespace.get(name), arrived.get(name)
            if not isinstance(old, RemoteValue) or new is None or new is old:
                continue
            for other in self.names_of(old):
                if other not in arrived:
                    self.namespace[other] = new
            # So do the containers holding it (``data = {"train": df}``).
            swap = {id(old): new}
            for holder in [n for n in self.kept_holders if n not in arrived]:
                value = self.namespace.get(holder)
                renewed = replace_inside(value, lambda ref: swap.get(id(ref), ref))  # noqa: B023
                if renewed is not value:
                    self.namespace[holder] = renewed

    def names_of(self, value: RemoteValue) -> list[str]:
        """The names bound to ``value``, but IPython's history names (``_``, ``_3``)."""
        found = [n for n, bound in list(self.namespace.items()) if bound is value]
        return [n for n in found if not is_history_name(n)]

    def _not_brought_back(self, run: CellRun, name: str, why: str) -> None:
        """Say that the cell's value for ``name`` could not come back (it cannot be pickled).

        A name the cell bound anew would no longer hold its old value locally: it goes, so
        that no later cell uses the old one unawares. One it changed in place keeps the
        value it had before the cell.
        """
        if name in run.superseded:
            return
        if name in run.rebound:
            self.namespace.pop(name, None)
            said = "it is not defined in the notebook after this cell"
        else:
            said = "the notebook keeps its value from before the cell"
        print(f"nbtask: {name} did not come back from the worker ({why}): {said}", file=sys.stderr)

    def _rehome(self, held: Mapping[str, list[Any]] | None) -> None:
        """Kept values the cell read and its process now holds: later work goes there.

        The cell loaded them from their store copy (their holder was gone, or another
        process ran it); a name rebound meanwhile is left alone.
        """
        for name, (key, holder, pid) in (held or {}).items():
            value = self.namespace.get(name)
            if isinstance(value, RemoteValue) and value.key == key:
                value.holder, value.holder_pid = str(holder), int(pid)
                if self._on_kept is not None:
                    self._on_kept(value)


def _loaded(
    run: CellRun, effects: Mapping[str, Any], objects: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    """A cell's values, and why each that cannot be loaded here did not come back.

    They are loaded together (names that share an object share it); if they do not load
    so (a class only the workers can import, a ``__setstate__`` raising here), one at a
    time: one that cannot be loaded loses no other.
    """
    try:
        return load_values(effects, objects), {}
    except Exception as exc:
        whole = exc
    try:
        arrived, failed = load_each(effects, objects)
    except Exception:  # not one value's failure: none is bound
        raise one_line(
            unloadable_values(run.label, _why(whole), missing=_missing(whole))
        ) from whole
    unloaded = {
        name: str(exc)
        if isinstance(exc, SharedWithFailed)
        else unloadable_value(_why(exc), missing=_missing(exc))
        for name, exc in failed.items()
    }
    return arrived, unloaded


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _missing(exc: BaseException) -> bool | None:
    """Whether what ``exc`` says is missing here: ``None`` if it says it all."""
    # An UnpicklingError: a notebook object they name is gone, as it says.
    return None if isinstance(exc, pickle.UnpicklingError) else lacks_code(exc)


def _with_objects(shown: Any, objects: Mapping[str, Any]) -> Any:
    """A ``--wait`` cell's last expression as it came, loaded with ``objects`` when asked."""
    if objects and isinstance(shown, tuple) and len(shown) == 2 and shown[0] == "value":
        how, packed = shown
        if isinstance(packed, Packed):
            return (how, WithObjects(packed, dict(objects)))
    return shown


def _kept_inside(value: Any) -> list[RemoteValue]:
    return [] if isinstance(value, RemoteValue) else kept_inside(value)


def _say(line: str) -> None:
    print(line, file=sys.stderr)
