"""A background cell's changes to the process-wide state, merged with the notebook's own.

A ``%%task`` cell is sent the kernel's settings and random generators as they are then
(:mod:`~nbtask.notebook.process_state`); a background cell's changes come back when it has
ended, while the notebook ran other cells meanwhile. Applied as they came, they would undo
what the notebook did since: the rule, for each kind of state the cell changed:

- A setting the notebook left alone since the cell was sent (as other cells' changes that
  came back left it): the cell's end state is applied, as a sequential run gives it.
- A setting made of keys (numpy's print options and error handling, pandas' options,
  matplotlib's rcParams, the ``decimal`` context, the inline backend's figure settings,
  environment variables, the loggers) that the notebook changed too: merged key by key.
  The keys only the cell changed take its values; the keys only the notebook changed keep
  the notebook's; a key both changed keeps the notebook's, and one ``nbtask:`` line names
  the cell, the setting and the key.
- A setting that is one value (the working directory, the recursion limit, the warnings
  filters, ``logging.disable``'s level) that both changed: the notebook's, said the same way.
- A random generator (:mod:`random`'s, :mod:`numpy.random`'s) is one value: if the notebook
  drew from it while the cell ran, the cell drew the same numbers from its copy, and its
  end state would replay the notebook's draws. The notebook's state stays, and one line
  says so (seed inside the cell, or pass it a Generator, for independent draws).

``sys.path`` entries a cell added or removed are each applied on their own, as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nbtask.notebook import logging_state, process_state
from nbtask.notebook.module_settings import same
from nbtask.wire.envelope import Envelope

__all__ = ["merged", "overlay"]

#: Kinds whose changes name only the keys a cell changed (``None`` in ``environ``: unset).
_CHANGED_KEYS = ("rcParams", "pandas", "environ", logging_state.SETUP)
#: Kinds whose changes are the whole setting as the cell left it, merged key by key.
_WHOLE = ("numpy.printoptions", "numpy.errors", "decimal", "inline")
_GENERATORS = ("random", "numpy.random")
#: Entries added and removed, each applied on its own: nothing to merge.
_PATHS = ("sys.path", "sys.path removed")

#: What a key missing from a setting stands for: an unset variable, a logger as it is fresh.
_ABSENT: dict[str, Any] = {"environ": None, logging_state.SETUP: logging_state.UNSET}
_MISSING = object()

#: Each kind as a line names it.
_NAMES = {
    "rcParams": "matplotlib's rcParams",
    "pandas": "pandas' options",
    "environ": "environment variables",
    logging_state.SETUP: "the loggers",
    logging_state.DISABLED_AT: "logging.disable()'s level",
    "numpy.printoptions": "numpy's print options",
    "numpy.errors": "numpy's error handling",
    "decimal": "the decimal context",
    "inline": "the inline backend's figure settings",
    "cwd": "the working directory",
    "recursionlimit": "the recursion limit",
    "warnings": "the warnings filters",
}


def merged(
    changed: Mapping[str, Any],
    sent: bytes,
    since: Mapping[str, Any],
    kernel: process_state.KernelState,
    cell: str,
) -> tuple[dict[str, Any], list[str]]:
    """What to apply of a cell's state ``changed``, and the lines that say what was not.

    ``sent``: the kernel's state the cell was sent with, pickled; ``since``: the changes
    other cells brought back since (:func:`overlay`), not the notebook's own; ``kernel``:
    the kernel's state keeper; ``cell``: the cell as a line names it.
    """
    if not sent or not changed:
        return dict(changed), []
    before = overlay(_as_sent(sent, kernel), since)
    now = process_state.capture()
    now.update(logging_state.snapshot())
    applied = dict(changed)
    generators: list[str] = []
    kept: list[str] = []
    for kind, value in changed.items():
        was, mine = _setting(before, kind), _setting(now, kind)
        if kind in _PATHS or was is None or mine is None or same(was, mine):
            continue  # the notebook left it alone: the cell's end state, as sequentially
        if kind in _GENERATORS:
            del applied[kind]
            generators.append(kind)
            continue
        both: list[str] = []
        if kind in _CHANGED_KEYS:
            absent = _ABSENT.get(kind, _MISSING)
            both = [k for k in value if not same(mine.get(k, absent), was.get(k, absent))]
            applied[kind] = {k: v for k, v in value.items() if k not in both}
        elif kind in _WHOLE:
            applied[kind], both = _merged_whole(value or {}, was, mine)
        else:
            del applied[kind]  # one value, changed by both: the notebook's
        if kind not in _CHANGED_KEYS + _WHOLE or both:
            name = _NAMES.get(kind, kind)
            kept.append(f"{name} ({', '.join(both)})" if both else name)
    lines = [_drew_line(cell, generators)] if generators else []
    if kept:
        lines.append(
            f"nbtask: {cell} and the notebook both changed {'; '.join(kept)} while it ran: "
            "the notebook's values are kept for those, the cell's other changes are applied "
            "(run such cells with --wait to have them one after the other)"
        )
    return {k: v for k, v in applied.items() if v or k not in _CHANGED_KEYS}, lines


def _merged_whole(
    value: Mapping[str, Any], was: Mapping[str, Any], mine: Mapping[str, Any]
) -> tuple[Any, list[str]]:
    """A setting the cell left as ``value`` and the notebook as ``mine``, both from ``was``.

    The notebook's, with the keys only the cell changed set (or removed) as the cell left
    them; and the keys both changed.
    """
    theirs = [k for k in {**was, **value} if not same(value.get(k, _MISSING), was.get(k, _MISSING))]
    both = [k for k in theirs if not same(mine.get(k, _MISSING), was.get(k, _MISSING))]
    result = dict(mine)
    for key in theirs:
        if key in both:
            continue
        if key in value:
            result[key] = value[key]
        else:
            result.pop(key, None)
    return result or None, both


def _setting(state: Mapping[str, Any], kind: str) -> Any:
    """A kind's value in a snapshot; ``None``: not known (a library not imported then)."""
    if kind == "inline":  # None, or left out: the backend's defaults
        return state.get(kind) or {}
    return state.get(kind)


def _as_sent(sent: bytes, kernel: process_state.KernelState) -> dict[str, Any]:
    """The kernel's state a cell was sent with, its environment whole (as a capture has it).

    A state names only the variables the notebook changed since nbtask was loaded; the
    others were as they were then.
    """
    state: dict[str, Any] = dict(Envelope({}, sent).load_body() or {})
    state["environ"] = {**kernel.baseline.environ, **state.get("environ", {})}
    return state


def overlay(state: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with a cell's ``changes`` (as applied) made to it.

    Kept for each background cell still to come back: the changes other cells brought back
    meanwhile are not the notebook's own (a later cell's change wins, as sequentially).
    """
    result = dict(state)
    for kind, value in changes.items():
        if kind in _PATHS:
            continue
        if kind in _CHANGED_KEYS:
            if kind in result and result[kind] is None:
                continue  # not known when sent: not merged
            result[kind] = {**result.get(kind, {}), **value}
        else:
            result[kind] = value
    return result


def _drew_line(cell: str, generators: list[str]) -> str:
    """The line saying the cell's random generators' end states were not applied."""
    names = " and ".join(generators)
    return (
        f"nbtask: {cell} drew from the same random state as the notebook did meanwhile "
        f"(its draws repeat those of the notebook), so its end state was not applied "
        f"({names}: the notebook's stays); seed inside the cell or use a Generator passed "
        "in (np.random.default_rng(seed), random.Random(seed)) for independent draws"
    )
