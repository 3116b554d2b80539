"""Shipping a cell: the pre-send check, and the values that travel with it.

:func:`prepare` checks and pickles the values a cell reads before anything is sent, and
builds the :class:`CellSpec` a worker runs (:mod:`nbtask.notebook.cellshell`).
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import importlib
import io
import os
import re
import sys
from collections.abc import Callable, Container, Iterable, Mapping
from typing import Any

import cloudpickle

from nbtask.core.handle import refusing_handles
from nbtask.errors import BlobError, CellError, CellNameError
from nbtask.notebook.analysis import SHELL_NAMES, CellAnalysis, analyze, is_history_name
from nbtask.notebook.cell_source import cell_syntax_error
from nbtask.notebook.module_code import cell_modules, module_name_of, ships_by_value
from nbtask.notebook.reach import named_inside
from nbtask.wire.blobs import Packed
from nbtask.wire.envelope import dumps

__all__ = [
    "CellSpec",
    "open_file",
    "prepare",
]


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
    line_offset : int
        Lines before the cell's first (the ``%%task`` line), so line numbers match.
    state : bytes
        The kernel's process-wide state, pickled, applied on the worker before the cell
        runs (empty: none).
    keep_threshold : int or None
        Assigned names whose pickled size is at least this stay on the workers
        (:mod:`nbtask.notebook.kept`); ``None``: every name comes back.
    keep, fetch : tuple of str
        Names kept on the workers whatever their size, and names that always come back.
    python : str
        ``source`` as the kernel's shell transformed it (magics, ``!cmd``), which the
        worker runs as the kernel would have; empty: the worker's shell transforms it.
    deleted : tuple of str
        Names a top-level ``del`` unbinds: reported deleted if the cell ends without them.
    shows : str
        The name the cell's last expression has in the notebook (``_7`` for ``Out[7]``),
        whose value comes back with the names; empty: only its display is sent.
    modules : tuple of (str, str)
        The notebook's own modules the cell uses, each with a fingerprint of its code as
        the kernel has it loaded: the worker says when its copy differs
        (:mod:`nbtask.notebook.module_code`).
    binds_sent : bool
        The kernel binds a name the cell binds to an object it was sent, unchanged, to
        its own object: the worker sends the shipped name, not a copy (``False``: an older
        kernel, or a plain cell, which is sent copies).
    sent_inside : bool
        The kernel also loads such an object where the values sent back hold it
        (``pair = (small, 1)``), named there by a persistent id: its shipped name.
    kept_inside : bool
        The kernel loads a kept value's reference where the values sent back hold one
        (``d = {"k": arr}``, ``arr`` kept): named there by a persistent id, the reference.
    inside : tuple of str
        Those of ``names`` the cell does not read but reaches inside the values it reads
        (``l`` of ``l = d["a"]`` for a cell reading ``d``): shipped with them, so that a
        change the cell makes through them (``d["a"].append(3)``) comes back into the
        notebook's object, as any shipped value's (:mod:`nbtask.notebook.reach`).
    """

    source: str
    filename: str
    names: tuple[str, ...]
    assigned: tuple[str, ...]
    retries: int = 0
    plain: bool = False
    line_offset: int = 0
    state: bytes = b""
    keep_threshold: int | None = None
    keep: tuple[str, ...] = ()
    fetch: tuple[str, ...] = ()
    python: str = ""
    deleted: tuple[str, ...] = ()
    shows: str = ""
    modules: tuple[tuple[str, str], ...] = ()
    binds_sent: bool = False
    sent_inside: bool = False
    inside: tuple[str, ...] = ()
    kept_inside: bool = False


_TRANSFORMS_KEPT = 256
_MANAGER_LISTS = ("cleanup_transforms", "line_transforms", "token_transformers")
_transforms: dict[tuple[Any, ...], str] = {}


def transformed(shell: Any, cell: str) -> str:
    """``shell.transform_cell(cell)``, remembered per cell text and set of transformers.

    IPython's transform tokenizes the whole cell (a fifth of a millisecond for one line)
    on each run; its result depends only on the text and the transformers registered,
    whose identities are part of the key (a transformer added later is used).
    """
    manager = shell.input_transformer_manager
    key = (
        cell,
        id(manager),
        *(tuple(map(id, transforms)) for transforms in _transformer_lists(shell, manager)),
    )
    python = _transforms.get(key)
    if python is None:
        python = str(shell.transform_cell(cell))
        if len(_transforms) >= _TRANSFORMS_KEPT:
            _transforms.clear()
        _transforms[key] = python
    return python


def _transformer_lists(shell: Any, manager: Any) -> list[Any]:
    lists = [getattr(manager, name, ()) for name in _MANAGER_LISTS]
    return [*lists, shell.input_transformers_post]


def analyzed(
    python: str,
    line_offset: int = 0,
    filename: str = "<cell>",
    parse: Callable[[str, str], Any] | None = None,
) -> CellAnalysis:
    """The cell's analysis, or the ``SyntaxError`` the notebook would raise for it.

    ``filename`` and ``line_offset``: where the notebook has the cell's lines; ``parse``
    its parser (see :func:`~nbtask.notebook.cell_source.cell_syntax_error`).
    """
    try:
        return analyze(python)
    except SyntaxError as exc:
        raise cell_syntax_error(exc, python, line_offset, filename, parse) from None


def prepare(
    source: str,
    python: str,
    namespace: Mapping[str, Any],
    *,
    filename: str,
    retries: int = 0,
    plain: bool = False,
    overrides: Mapping[str, Any] | None = None,
    hidden: Container[str] = (),
    line_offset: int = 0,
    state: bytes = b"",
    found: CellAnalysis | None = None,
    keep_threshold: int | None = None,
    keep: tuple[str, ...] = (),
    fetch: tuple[str, ...] = (),
    shows: str = "",
) -> tuple[CellSpec, Packed, CellAnalysis]:
    """Check a cell and pickle its inputs; raise :class:`CellError` before anything is sent.

    Parameters
    ----------
    source
        The cell as typed.
    python
        The same cell transformed to plain Python (``shell.transform_cell``).
    namespace
        Where the values of the names it reads come from (the notebook's ``user_ns``).
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
    state
        The kernel's process-wide state, pickled
        (:meth:`nbtask.notebook.process_state.KernelState.pickled`); empty: none.
    found
        The cell's analysis, if the caller already made it (:func:`analyzed`).
    keep_threshold, keep, fetch, shows
        The :class:`CellSpec`'s fields of those names (``%%task --keep/--fetch``).

    Returns
    -------
    (CellSpec, Packed, CellAnalysis)
        The spec, the pickled ``{name: value}`` of the shipped names, and the analysis.
    """
    found = found or analyzed(python, line_offset, filename)
    _refuse_what_a_worker_cannot_do(python, found, namespace)
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(found.reads))
    if unknown:
        raise CellError(f"the cell does not read {', '.join(map(repr, unknown))}")
    values = _values(found, namespace, overrides, hidden, python)
    files = [f"variable {n!r}: {why}" for n, v in values.items() if (why := open_file(v))]
    if files:
        raise CellError(
            f"{'; '.join(files)}. Nothing was sent. Open the file inside the cell, or pass its path"
        )
    _ship_local_modules(values.values())
    inside = {} if plain else named_inside(values, namespace, hidden)
    _ship_local_modules(inside.values())
    blob = _packed_with(values, inside)
    if blob is None:
        inside = {}
        try:
            # Pickled once, here, to name what cannot be; large arrays stay uncopied and
            # travel out of band (nbtask.wire.blobs), so inputs have no size ceiling.
            with refusing_handles():
                blob = Packed.of(values)
        except CellError:  # a task handle among them
            raise CellError(_handles_in(values)) from None
        except BlobError as exc:  # a kept value released with the session that kept it
            raise CellError(f"{exc}. Nothing was sent") from None
        except Exception:
            raise CellError(_unpicklable(values)) from None
    values.update(inside)
    spec = CellSpec(
        source,
        filename,
        tuple(values),
        found.assigned,
        retries,
        plain,
        line_offset,
        state,
        keep_threshold=keep_threshold,
        keep=keep,
        fetch=fetch,
        python=python,
        deleted=found.deleted,
        shows=shows,
        modules=cell_modules(found.imports, values.values()),
        binds_sent=not plain,
        sent_inside=not plain,
        inside=tuple(inside),
        kept_inside=not plain,
    )
    return spec, blob, found


def _packed_with(values: Mapping[str, Any], inside: Mapping[str, Any]) -> Packed | None:
    """``values`` and the notebook's objects ``inside`` them, in one pickle, if it can be.

    One pickle: on the worker, the value holding ``l`` holds the ``l`` shipped. ``None``
    if there are none, or they cannot be pickled with the values (one the value's own
    pickle leaves out, a lock its ``__getstate__`` drops): the values are then sent alone.
    """
    if not inside:
        return None
    try:
        with refusing_handles():
            return Packed.of({**values, **inside})
    except Exception:
        return None


# Line magics that act on the kernel's own process or environment.
_KERNEL_MAGICS = re.compile(r"run_line_magic\(['\"](pip|conda|mamba|who|whos|who_ls)['\"]")


def _refuse_what_a_worker_cannot_do(
    python: str, found: CellAnalysis, namespace: Mapping[str, Any]
) -> None:
    magic = _KERNEL_MAGICS.search(python)
    if magic:
        raise CellError(
            f"%{magic.group(1)} acts on this kernel (its packages, its names): run it in a "
            "cell without %%task"
        )
    widgets = "ipywidgets" in found.imports or any(
        module_name_of(namespace[n]).startswith("ipywidgets") for n in found.reads if n in namespace
    )
    if widgets:
        raise CellError(
            "widgets live in the kernel that shows them, not on a worker: run this cell "
            "without %%task (do the heavy work in a %%task cell before it)"
        )


def _values(
    found: CellAnalysis,
    namespace: Mapping[str, Any],
    overrides: Mapping[str, Any],
    hidden: Container[str],
    python: str,
) -> dict[str, Any]:
    """The values to ship, by name; a name read now but defined nowhere is refused."""
    values: dict[str, Any] = {}
    undefined = []
    starred = _star_names(found.star_imports)
    for name in found.reads:
        if name in overrides:
            values[name] = overrides[name]
        elif is_history_name(name) and name in namespace:
            values[name] = namespace[name]  # the notebook's history, though IPython hides it
        elif name in hidden or name in SHELL_NAMES:
            continue
        elif name in namespace:
            values[name] = namespace[name]
        elif name in found.late or name in starred or hasattr(builtins, name):
            continue  # read when a function runs (maybe defined by then), or bound by *
        elif name in found.guarded:
            continue  # the cell catches the NameError, or tests for the name, itself
        elif name not in found.assigned:
            undefined.append(name)
    # Magics can bind names the analysis cannot see (``%run script.py``), and so can a cell
    # writing to ``globals()``: let the worker judge.
    if undefined and "get_ipython()" not in python and not found.namespace:
        more = f" (nor {', '.join(map(repr, undefined[1:]))})" if len(undefined) > 1 else ""
        raise CellNameError(f"name {undefined[0]!r} is not defined{more}")
    # Names reached through strings (``display('df1')``, ``eval('x')``) or read by a
    # script run in the namespace (``%run -i``): shipped when they can be, as locally
    # they would be found in the namespace.
    for name in [*found.named_strings, *_script_reads(found.scripts)]:
        if name in namespace and name not in values and name not in hidden:
            with contextlib.suppress(Exception):
                dumps(namespace[name])
                values[name] = namespace[name]
    return values


def _script_reads(scripts: Iterable[str]) -> list[str]:
    """The names the Python scripts ``%run -i`` runs read, as found here now.

    Found as ``%run`` finds them (``~`` expanded, ``.py`` added if need be), from this
    kernel's working directory. One that cannot be read or parsed here reads nothing
    known: ``%run`` on the worker says what it makes of it.
    """
    reads: list[str] = []
    for script in scripts:
        path = os.path.expanduser(script)
        if not os.path.isfile(path) and os.path.isfile(f"{path}.py"):
            path = f"{path}.py"
        if path.endswith((".ipy", ".ipynb")):
            continue  # IPython's own syntax, not looked into
        try:
            with open(path, encoding="utf-8") as file:
                reads += analyze(file.read()).reads
        except (OSError, SyntaxError, ValueError):
            continue
    return reads


def _star_names(modules: Iterable[str]) -> set[str]:
    """The names ``from module import *`` binds, for modules this kernel can import."""
    names: set[str] = set()
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except Exception:  # the cell may import what only the workers have
            continue
        public = getattr(module, "__all__", None)
        if public is None:
            public = [n for n in vars(module) if not n.startswith("_")]
        names.update(str(n) for n in public)
    return names


def open_file(value: Any) -> str | None:
    """Why ``value`` cannot travel if it is a file; else ``None``.

    Pickled, a file opened for reading would arrive as a ``StringIO`` of its text, not
    the open file the cell holds, and a closed one (``with open(...) as f``) does not
    pickle at all: it is named instead. In-memory ones travel.
    """
    if isinstance(value, io.IOBase) and not isinstance(value, (io.StringIO, io.BytesIO)):
        try:
            closed = value.closed
        except ValueError:  # its buffer detached: no file any more either
            closed = True
        kind = "a closed file" if closed else "an open file"
        return f"{type(value).__name__} is {kind}, which cannot travel between processes"
    return None


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


def _handles_in(values: Mapping[str, Any]) -> str:
    """The variables that hold task handles, which stay in the kernel that sent the task."""
    found = []
    for name, value in values.items():
        try:
            with refusing_handles():
                dumps(value)
        except CellError as exc:
            found.append(f"{name!r} holds {exc}")
        except Exception:
            continue
    return (
        f"{'; '.join(found)}: a %%task cell cannot use a task handle, which stays in this "
        "kernel. Use its result: read it in a cell without %%task first (h.get()), or give "
        "the handle to a function task (f.delay(h)), whose worker reads the result itself. "
        "Nothing was sent"
    )


def _ship_local_modules(values: Iterable[Any]) -> None:
    """Pickle by value the modules written next to the notebook that the values come from.

    Workers on other machines cannot import them; pickling them by value ships the code.
    """
    for name in {module_name_of(value).partition(".")[0] for value in values}:
        module = sys.modules.get(name)
        if module is not None and ships_by_value(module):
            cloudpickle.register_pickle_by_value(module)
