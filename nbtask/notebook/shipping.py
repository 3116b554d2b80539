"""Shipping a cell: the pre-send check, and the values that travel with it.

:func:`prepare` checks and pickles the values a cell reads before anything is sent, and
builds the :class:`CellSpec` a worker runs (:mod:`nbtask.notebook.cellshell`).
"""

from __future__ import annotations

import builtins
import dataclasses
import os
import sys
import types
from collections.abc import Container, Iterable, Mapping
from typing import Any

import cloudpickle

from nbtask.errors import CellError
from nbtask.notebook.analysis import SHELL_NAMES, CellAnalysis, analyze
from nbtask.wire.envelope import Envelope, dumps

__all__ = ["CellSpec", "load_values", "prepare"]


@dataclasses.dataclass(frozen=True)
class CellSpec:
    """Everything a worker needs to run a cell, except the shipped values.

    Attributes
    ----------
    source : str
        The cell as typed (IPython syntax included); the worker's shell transforms it.
    filename : str
        Name the cell's code is compiled under, so tracebacks say ``Cell In[7], line 3``.
    names : tuple of str
        The shipped names, whose in-place changes are looked for.
    assigned : tuple of str
        Names the cell assigns (found statically).
    retries : int
        Rerun the cell this many times after an exception.
    plain : bool
        Return ``{name: value}`` (a named cell's ``.delay``) instead of a packed blob.
    """

    source: str
    filename: str
    names: tuple[str, ...]
    assigned: tuple[str, ...]
    retries: int = 0
    plain: bool = False
    line_offset: int = 0


def prepare(
    source: str,
    python: str,
    namespace: Mapping[str, Any],
    *,
    max_bytes: int,
    filename: str,
    retries: int = 0,
    plain: bool = False,
    overrides: Mapping[str, Any] | None = None,
    hidden: Container[str] = (),
    line_offset: int = 0,
) -> tuple[CellSpec, bytes, CellAnalysis]:
    """Check a cell and pickle its inputs; raise :class:`CellError` before anything is sent.

    Parameters
    ----------
    source
        The cell as typed.
    python
        The same cell transformed to plain Python (``shell.transform_cell``).
    namespace
        Where the values of the names it reads come from (the notebook's ``user_ns``).
    max_bytes
        The broker's message size limit (``settings.max_message_bytes``).
    filename
        The name tracebacks will show for the cell.
    retries, plain
        See :class:`CellSpec`.
    overrides
        Values used instead of the namespace's (a named cell rerun with other inputs).
    line_offset
        See :class:`CellSpec`.
    hidden
        The shell's own names (``get_ipython``, ``In``...): the worker's shell has its own.

    Returns
    -------
    (CellSpec, bytes, CellAnalysis)
        The spec, the pickled ``{name: value}`` of the shipped names, and the analysis.
    """
    try:
        found = analyze(python)
    except SyntaxError as exc:
        raise CellError(f"the cell does not parse: {exc}") from None
    overrides = dict(overrides or {})
    values: dict[str, Any] = {}
    undefined = []
    for name in found.reads:
        if name in overrides:
            values[name] = overrides[name]
        elif name in hidden or name in SHELL_NAMES:
            continue
        elif name in namespace:
            values[name] = namespace[name]
        elif not hasattr(builtins, name) and name not in found.assigned:
            undefined.append(name)
    unknown = sorted(set(overrides) - set(found.reads))
    if unknown:
        raise CellError(f"the cell does not read {', '.join(map(repr, unknown))}")
    # Magics can bind names the analysis cannot see (``%time v = 3``): let the worker judge.
    if undefined and "get_ipython()" not in python:
        names = ", ".join(repr(n) for n in undefined)
        raise CellError(f"name {names} is not defined in the notebook (the cell reads it)")
    _ship_local_modules(values.values())
    try:
        blob = dumps(values)
    except Exception:
        raise CellError(_unpicklable(values)) from None
    size = len(blob) + len(source.encode())
    if size > max_bytes:
        sizes = sorted(((len(dumps(v)), n) for n, v in values.items()), reverse=True)
        biggest = ", ".join(f"{n!r} ({s / 1e6:.1f} MB)" for s, n in sizes[:3])
        raise CellError(
            f"the cell's inputs are {size / 1e6:.1f} MB, over the {max_bytes / 1e6:.1f} MB "
            f"message limit (max_message_bytes); the biggest: {biggest}. Load the data "
            "inside the cell (e.g. from a path) instead of shipping it"
        )
    spec = CellSpec(source, filename, tuple(values), found.assigned, retries, plain, line_offset)
    return spec, blob, found


def _unpicklable(values: Mapping[str, Any]) -> str:
    problems = []
    for name, value in values.items():
        try:
            dumps(value)
        except Exception as exc:
            problems.append(
                f"variable {name!r} ({type(value).__module__}.{type(value).__qualname__}) "
                f"cannot be pickled: {exc}"
            )
    detail = "; ".join(problems) or "the shipped values cannot be pickled together"
    return (
        f"{detail}. Nothing was sent. Create such objects inside the cell (open the "
        "connection or file there) or pass something picklable (a path, a plain value)"
    )


def _ship_local_modules(values: Iterable[Any]) -> None:
    """Pickle by value the modules written next to the notebook that the values come from.

    Workers on other machines cannot import them; pickling them by value ships the code.
    """
    for value in values:
        if isinstance(value, types.ModuleType):
            name = value.__name__
        else:
            name = getattr(value, "__module__", None) or type(value).__module__
        module = sys.modules.get(str(name).split(".")[0])
        if module is not None and _is_local(module):
            cloudpickle.register_pickle_by_value(module)


def _is_local(module: types.ModuleType) -> bool:
    path = getattr(module, "__file__", None)
    if (
        not path
        or module.__name__ in ("__main__", "nbtask")
        or module.__name__ in sys.builtin_module_names
    ):
        return False
    path = os.path.abspath(path)
    installed = {os.path.abspath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    if any(path.startswith(p + os.sep) for p in installed) or "site-packages" in path:
        return False
    return bool(path.startswith(os.path.abspath(os.getcwd()) + os.sep))


def load_values(result: Mapping[str, Any]) -> dict[str, Any]:
    """Unpickle the values a cell sent back (on the kernel's main thread).

    The blob is part of a result whose envelope was verified by the listener.
    """
    blob = result.get("values", b"")
    values: dict[str, Any] = Envelope({}, blob).load_body() if blob else {}
    return values
