"""Process-wide state that a cell can read or change without naming a variable.

matplotlib's rcParams (``plt.rc``, ``plt.style.use``, seaborn themes), the inline backend's
figure formats (``%config InlineBackend.figure_formats``), the global random
generators of :mod:`random` and :mod:`numpy.random`, numpy's print options and
floating-point error handling, pandas options, the ``decimal`` context (its precision,
rounding and traps), warnings filters, the recursion limit, the
logging setup (:mod:`~nbtask.notebook.logging_state`), the working directory, environment
variables and ``sys.path`` additions made from the notebook. A ``%%task`` cell is shipped
with a snapshot of the kernel's (:func:`capture`), the worker applies it before the cell
runs (:func:`apply`), and what the cell changed comes back (:func:`changes`) to be applied
in the kernel: a sequence of cells gives the same numbers and the same figures whichever
worker runs each, and as if they had run locally.

Only state of modules already imported is captured; nothing here imports matplotlib,
numpy or pandas.
"""

from __future__ import annotations

import contextlib
import decimal
import importlib
import os
import random
import sys
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, cast

from nbtask.core.context import runs_started
from nbtask.notebook import logging_state, task_threads
from nbtask.notebook.module_settings import (
    NUMPY_ERRORS_DEFAULTS,
    NUMPY_PRINT_DEFAULTS,
    decimal_context,
    inline_backend,
    numpy_print_options,
    pandas_defaults,
    pandas_options,
    rc_params,
    same,
    set_decimal_context,
    set_inline_backend,
    set_numpy_errors,
    set_numpy_print_options,
    set_pandas_options,
    set_rc_params,
)
from nbtask.wire.envelope import dumps

__all__ = [
    "NO_CHANGES",
    "STATE_MODULES",
    "Applied",
    "Baseline",
    "KernelState",
    "apply",
    "capture",
    "changes",
    "imported_state_modules",
]

#: One snapshot: kind -> its state (each kind optional).
State = dict[str, Any]


#: The modules whose settings a snapshot holds when they are imported: a worker applying
#: it imports them.
STATE_MODULES = ("numpy", "matplotlib", "pandas")

#: The settings of a module a snapshot names ``None`` when the kernel has not imported it:
#: a worker puts its own back as a fresh process has them (see :func:`_apply_settings`).
_RESET_WHEN_NOT_IMPORTED = ("rcParams", "inline", "pandas", "numpy.printoptions", "numpy.errors")

#: A cell's changes to the state when it changed none, pickled (as :func:`dumps` does).
NO_CHANGES = dumps({})

#: This process's own ``sys.path`` (a worker's, as it started): a path the notebook shipped
#: and then removed is removed here only if it was not one of these.
_OWN_PATH = frozenset(sys.path)


class Baseline:
    """What the kernel's environment and ``sys.path`` were when nbtask was loaded.

    Only what the notebook changed since is shipped: a worker keeps its own ``PATH``,
    ``NBTASK_*`` and paths, which may rightly differ on another machine. ``shell``: the
    kernel's IPython shell, whose inline backend's settings are read (``None``: looked up).
    """

    def __init__(self, shell: Any = None) -> None:
        self.shell = shell
        self.environ = _environ()
        self.path = list(sys.path)
        self.set_since: set[str] = set()  # variables the notebook changed since, once shipped
        # Entries it added to sys.path since, once shipped (a dict: in order, once each).
        self.added_since: dict[str, None] = {}

    def environ_changes(self) -> dict[str, str | None]:
        """Variables set, changed or removed since (``None``: removed).

        One shipped is shipped from then on, as it is now: a worker that was shipped it
        would keep it otherwise, when the notebook deletes it or puts it back as it was.
        """
        now = _environ()
        if (now is self.environ or now == self.environ) and not self.set_since:
            return {}
        changed: dict[str, str | None] = {k: v for k, v in now.items() if self.environ.get(k) != v}
        changed.update({k: None for k in self.environ if k not in now})
        self.set_since.update(changed)
        return {k: now.get(k) for k in sorted(self.set_since)}

    def note_changes(self, changed: Mapping[str, Any]) -> None:
        """Note the variables and paths a cell on a worker changed: the workers have them.

        Applied here without being shipped, they are shipped from now on, so that the
        notebook deleting one later reaches the workers too.
        """
        self.set_since.update(changed.get("environ", {}))
        paths = changed.get("sys.path", [])
        self.added_since.update(dict.fromkeys(p for p in paths if p not in self.path))

    def path_additions(self) -> list[str]:
        """Entries of ``sys.path`` added since, in order."""
        added = [p for p in sys.path if p not in self.path]
        self.added_since.update(dict.fromkeys(added))
        return added

    def path_removals(self) -> list[str]:
        """Entries added since (and so shipped), then removed: a worker removes them too."""
        return [p for p in self.added_since if p not in sys.path]


class KernelState:
    """The kernel's state for each cell it ships, pickled again only when it changed.

    Between cells it rarely changes, and comparing it costs a fraction of pickling it
    (some 17 KB with numpy and matplotlib imported). ``shell``: the kernel's (see
    :class:`Baseline`).
    """

    def __init__(self, shell: Any = None) -> None:
        self.baseline = Baseline(shell)
        self.last: tuple[State, bytes] = ({}, b"")

    def apply_changes(self, changed: Mapping[str, Any]) -> None:
        """Apply here what a cell changed on a worker (see :meth:`Baseline.note_changes`).

        A path the cell took off ``sys.path`` goes here too, as it would locally, even one
        the kernel started with.
        """
        apply(changed, keep_own_paths=False)
        logging_state.set_in_kernel(changed)
        self.baseline.note_changes(changed)

    def pickled(self) -> bytes:
        """The state now (:func:`capture` with the baseline), pickled."""
        state = capture(self.baseline)
        last_state, last_pickled = self.last
        if state.keys() == last_state.keys() and all(
            same(last_state[k], v) for k, v in state.items()
        ):
            return last_pickled
        pickled = dumps(state)
        # Compared later as captured: a capture shares nothing a cell can change in place
        # with the live settings (the settings' snapshots copy their lists and cyclers),
        # and the values a snapshot gives again compare by identity, in C.
        self.last = (state, pickled)
        return pickled


class Applied:
    """The kernel's state a worker process is in, so that it is not applied again unchanged.

    Applying a state and taking the snapshot a cell's changes are measured from cost more
    than a trivial cell (pandas' options, matplotlib's settings, the random generators).
    A process is still in the state it applied for the cell before when that cell came
    with the same pickled state, changed none of it and left no thread of its own
    running, and no other task (nor a dataset's loader) ran here since: any of those could
    have changed it.

    The recursion limit and the ``decimal`` context are the cell's only while it runs: a
    plain task run here next finds the process's own (a kernel's higher limit could let its
    runaway recursion overflow the C stack instead of raising :class:`RecursionError`; a
    notebook's 5 digits would round a task's sums).
    """

    def __init__(self) -> None:
        self._pickled: bytes | None = None  # the state the process is in, as shipped
        self._after: State = {}  # its snapshot, taken after the cell that left it so
        self._runs = -1  # tasks begun in this process when that cell began
        self._lent = _Lent()
        self._own_limit: int | None = None  # the recursion limit to put back after the cell
        self._own_decimal: decimal.Context | None = None  # and the decimal context

    def enter(self, pickled: bytes, state: Mapping[str, Any], *, again: bool = False) -> State:
        """Be in ``state`` (``pickled`` as shipped) for a cell; the snapshot before it.

        ``again``: a retry of a cell that may have changed the state: applied whatever.
        """
        runs = runs_started()
        in_it = not again and pickled == self._pickled and runs - 1 == self._runs
        # Until this cell is known to have left the state as it found it (see leave()).
        self._pickled, self._runs = None, runs
        if self._own_limit is None:  # (set already: a retry, or a cell that never left)
            self._own_limit = sys.getrecursionlimit()
            self._own_decimal = decimal.getcontext()
            decimal.setcontext(self._own_decimal.copy())  # the cell's, changed in its place
        if in_it:
            # Put back to the process's own after each cell.
            if "recursionlimit" in state:
                _set_recursion_limit(state["recursionlimit"])
            if "decimal" in state:
                set_decimal_context(state["decimal"])
            return self._after
        self._lent.take_back(state)
        apply(state)
        return capture(applied=state)

    def leave(self, pickled: bytes, before: State) -> State:
        """What the cell changed since ``before``; noted, to skip the next apply if nothing."""
        # Threads first: one the cell left running could change the state after the
        # snapshot, so with one alive the next cell applies the state whatever.
        others = task_threads.alive()
        after = capture()
        if self._own_limit is not None:
            _set_recursion_limit(self._own_limit)
            self._own_limit = None
        if self._own_decimal is not None:
            decimal.setcontext(self._own_decimal)
            self._own_decimal = None
        changed = changes(before, after)
        own = before.get("environ", {})
        self._lent.note(changed.get("environ", {}), changed.get("sys.path", []), own)
        # changes() does not tell a path a cell moved within sys.path: it is still to be
        # put back in its place for the next cell.
        if not changed and not others and before.get("sys.path") == after.get("sys.path"):
            self._pickled, self._after = pickled, after
        return changed


class _Lent:
    """Variables and ``sys.path`` entries that kernels' states and cells set in a worker.

    A state names only its own kernel's changes (see :class:`Baseline`): a cell of another
    kernel on the same worker must not find the first one's. So whatever the next state
    applied here does not name goes back to what this process had of its own first.
    """

    def __init__(self) -> None:
        self.environ: dict[str, str | None] = {}  # variable: its own value (None: unset)
        self.paths: list[str] = []  # entries put on sys.path here

    def take_back(self, state: Mapping[str, Any]) -> None:
        """Before ``state`` is applied: put back what it does not name, note what it sets."""
        named = state.get("environ", {})
        _set_environ({k: self.environ.pop(k) for k in list(self.environ) if k not in named})
        listed = state.get("sys.path", [])
        _remove_from_path([p for p in self.paths if p not in listed])
        self.paths = [p for p in self.paths if p in listed]
        self.note(named, [p for p in listed if p not in sys.path], os.environ)

    def note(self, environ: Mapping[str, Any], paths: list[str], own: Mapping[str, str]) -> None:
        """Note variables and paths about to be set (or just set by a cell), with ``own`` values."""
        for key in environ:
            self.environ.setdefault(key, own.get(key))
        self.paths += [p for p in paths if p not in self.paths and p not in _OWN_PATH]


def imported_state_modules() -> list[str]:
    """The :data:`STATE_MODULES` this process has imported: its snapshots' modules."""
    return [name for name in STATE_MODULES if name in sys.modules]


def capture(baseline: Baseline | None = None, applied: Mapping[str, Any] | None = None) -> State:
    """A snapshot of the process-wide state of the modules imported here.

    With ``baseline`` (the kernel, shipping a cell): also the environment and ``sys.path``
    changes since, and ``None`` for matplotlib's and pandas' settings when they are not
    imported here, which tells a worker to put its own back to a fresh process's.
    ``applied``: a state just given to :func:`apply`, whose random generators' states the
    process now has as they are there (reading numpy's again costs tens of microseconds).
    """
    applied = applied or {}
    state: State = {"warnings": list(warnings.filters)}
    state["random"] = applied["random"] if "random" in applied else random.getstate()
    with contextlib.suppress(OSError):
        state["cwd"] = os.getcwd()
    numpy = sys.modules.get("numpy")
    if "numpy.random" in applied:
        state["numpy.random"] = applied["numpy.random"]
    elif numpy is not None:
        state["numpy.random"] = numpy.random.get_state()
    if numpy is not None:
        state["numpy.printoptions"] = numpy_print_options(numpy)
        state["numpy.errors"] = numpy.geterr()
    state["recursionlimit"] = sys.getrecursionlimit()
    state["decimal"] = decimal_context()
    matplotlib = sys.modules.get("matplotlib")
    if matplotlib is not None:
        state["rcParams"] = rc_params(matplotlib.rcParams)
    # The kernel's shell as given: looking it up each cell cost as much as reading it.
    shell = baseline.shell if baseline is not None and baseline.shell is not None else _shell()
    figures = inline_backend(shell)
    if figures is not None:
        state["inline"] = figures
    pandas = sys.modules.get("pandas")
    if pandas is not None:
        state["pandas"] = pandas_options(pandas)
    if baseline is not None:
        state.update(logging_state.snapshot())  # the cell's while it runs (see there)
        for kind in _RESET_WHEN_NOT_IMPORTED:
            state.setdefault(kind, None)
        state["environ"] = baseline.environ_changes()
        added = baseline.path_additions()
        state["sys.path"] = [*(p for p in _cwd_entries() if p not in added), *added]
        removed = baseline.path_removals()
        if removed:  # rare: the usual state's pickle stays as it was
            state["sys.path removed"] = removed
    else:  # whole, for changes() to tell what a cell did
        state["environ"] = _environ()
        state["sys.path"] = list(sys.path)
    return state


def _shell() -> Any:
    """The IPython shell of this process (the kernel's, or a worker's), if it has one."""
    ipython = sys.modules.get("IPython")
    return ipython.get_ipython() if ipython is not None else None


def _cwd_entries() -> list[str]:
    """The kernel's ``sys.path`` entries that stand for the working directory (``''``).

    A kernel imports modules beside the notebook (its working directory, which a cell's
    ``os.chdir`` moves) through ``''``; a worker started elsewhere, or given absolute paths,
    has no such entry. Shipped with every cell (not only once added), the worker puts it on
    while the kernel's cells run there, and takes it off for another kernel's that lacks it.
    """
    return [entry for entry in sys.path if entry in ("", ".")]


class _EnvironReader:
    """``os.environ`` as a dict, decoded only when it changed since the last one.

    Reading ``os.environ`` decodes every item, which cost more than the rest of a
    snapshot; its raw items compare in about a microsecond. The dict given is the one
    given last while the environment is unchanged, to be read, never changed: snapshots
    holding it compare by identity (see :func:`~.module_settings.same`).
    """

    def __init__(self) -> None:
        # One attribute: another thread sees both halves of the same read, or neither.
        self.last: tuple[dict[Any, Any], dict[str, str]] = ({}, {})

    def __call__(self) -> dict[str, str]:
        raw = getattr(os.environ, "_data", None)
        if not isinstance(raw, dict):  # another Python's environ: read it the usual way
            return dict(os.environ)
        last_raw, decoded = self.last
        if raw != last_raw:
            raw = dict(raw)
            environ: Any = os.environ
            decoded = {environ.decodekey(k): environ.decodevalue(v) for k, v in raw.items()}
            self.last = (raw, decoded)
        return decoded


_environ = _EnvironReader()


def apply(state: Mapping[str, Any], *, keep_own_paths: bool = True) -> None:
    """Make this process's state what ``state`` says (kinds it does not name stay).

    Values that could be changed in place are copied in, so ``state`` stays as it was
    (and can be applied again). ``keep_own_paths``: the paths this process started with
    stay on ``sys.path`` even when ``state`` removes them (a worker's own).
    """
    if "random" in state:
        random.setstate(state["random"])
    if "warnings" in state:
        # In place: the interpreter's C side holds this very list.
        filters = cast("list[Any]", warnings.filters)
        filters[:] = state["warnings"]
        warnings._filters_mutated()  # type: ignore[attr-defined]  # as simplefilter does
    if "cwd" in state:
        # Another machine may not have the kernel's folder: the worker's own stays then.
        with contextlib.suppress(OSError):
            os.chdir(state["cwd"])
    if "numpy.random" in state:
        # The kernel had it, so the cell's code expects it here too.
        importlib.import_module("numpy").random.set_state(state["numpy.random"])
    if "recursionlimit" in state:
        _set_recursion_limit(state["recursionlimit"])
    if "decimal" in state:
        set_decimal_context(state["decimal"])
    _apply_settings(state)
    _set_environ(dict(state.get("environ", {})))
    _remove_from_path(state.get("sys.path removed", []), keep_own=keep_own_paths)
    for entry in reversed(list(state.get("sys.path", []))):
        if entry not in sys.path:
            sys.path.insert(0, entry)


def _set_environ(values: Mapping[str, str | None]) -> None:
    """Set each variable to its value; ``None`` unsets it."""
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _remove_from_path(entries: Iterable[str], *, keep_own: bool = True) -> None:
    """Take ``entries`` off ``sys.path`` (with ``keep_own``, not those it started with)."""
    for entry in entries:
        while entry in sys.path and not (keep_own and entry in _OWN_PATH):
            sys.path.remove(entry)


def _set_recursion_limit(limit: int) -> None:
    """Set the recursion limit; one below this thread's depth now is left (it cannot be)."""
    with contextlib.suppress(RecursionError, ValueError):
        sys.setrecursionlimit(limit)


def _apply_settings(state: Mapping[str, Any]) -> None:
    """Set rcParams, figure formats, pandas' and numpy's options; ``None``: their defaults.

    Only what differs is set: putting every setting back costs milliseconds per cell
    (pandas' ``reset_option("all")`` about 5 ms), and they rarely differ.
    """
    if "rcParams" in state:
        if state["rcParams"] is not None:
            set_rc_params(importlib.import_module("matplotlib"), state["rcParams"])
        elif "matplotlib" in sys.modules:
            matplotlib = sys.modules["matplotlib"]
            if not same(rc_params(matplotlib.rcParams), rc_params(matplotlib.rcParamsOrig)):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    matplotlib.rc_file_defaults()
    if "inline" in state:
        set_inline_backend(_shell(), state["inline"])
    if "pandas" in state:
        options = state["pandas"]
        if options is None and "pandas" in sys.modules:
            options = pandas_defaults(sys.modules["pandas"])
        if options is not None:
            set_pandas_options(importlib.import_module("pandas"), options)
    for kind, put, defaults in _NUMPY_SETTINGS:
        if kind not in state or (state[kind] is None and "numpy" not in sys.modules):
            continue  # (None, numpy not imported here: it will start with its defaults)
        put(importlib.import_module("numpy"), defaults if state[kind] is None else state[kind])


#: numpy's settings a snapshot holds: kind, how to set it, numpy's defaults.
_NUMPY_SETTINGS = (
    ("numpy.printoptions", set_numpy_print_options, NUMPY_PRINT_DEFAULTS),
    ("numpy.errors", set_numpy_errors, NUMPY_ERRORS_DEFAULTS),
)


def changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> State:
    """What differs from ``before`` in ``after``: the state a cell changed."""
    changed: State = {}
    for kind, value in after.items():
        if kind in before and same(before[kind], value):
            continue  # as is usual: one comparison of the whole, before any item's
        if kind in ("rcParams", "pandas"):
            old = before.get(kind, {})
            diff = {k: v for k, v in value.items() if k not in old or not same(old[k], v)}
            if diff:
                changed[kind] = diff
        elif kind == "environ":
            old = before.get(kind, {})
            diff = {k: v for k, v in value.items() if old.get(k) != v}
            diff.update({k: None for k in old if k not in value})
            if diff:
                changed[kind] = diff
        elif kind == "sys.path":
            old = before.get(kind, [])
            added = [p for p in value if p not in old]
            if added:
                changed[kind] = added
            removed = [p for p in old if p not in value]
            if removed:
                changed["sys.path removed"] = removed
        else:
            changed[kind] = value
    return changed
